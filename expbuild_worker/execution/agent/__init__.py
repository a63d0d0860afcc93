"""The native helper, ``expbuild-agent`` (a static C program; ``make agent`` builds it here).

Two roles, one binary: PID 1 of a Docker pool container, which starts each action's command
without the engine (``execution/docker/_agent.py``), and a host action's placed child, which
the worker starts ahead of need in the action's cgroups and which becomes the command
(``execution/process/_helper_starter.py``). The protocol of each is described in the C file.
"""

from __future__ import annotations

import stat
from pathlib import Path

BINARY_NAME = "expbuild-agent"


def bundled_agent() -> Path:
    """Where ``make agent`` puts the binary: beside its source, in the package."""
    return Path(__file__).with_name(BINARY_NAME)


def usable_agent(path: Path) -> str:
    """Why the agent at ``path`` cannot be used; empty when it can."""
    try:
        info = path.stat()
    except OSError as err:
        return f"no agent binary at {path} ({err.strerror}; `make agent` builds it)"
    if not stat.S_ISREG(info.st_mode) or not info.st_mode & 0o001:
        return f"{path} is not a file every user may execute"
    return ""
