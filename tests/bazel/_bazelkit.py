"""Running a real Bazel hermetically over a copy of the genrule workspace (for tests and benchmarks)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

WORKSPACE = Path(__file__).parent / "workspace"
BAZEL_SECONDS = 300
"""Longest one Bazel command may take before it is killed (with its JVM) and reported failed."""
IDLE_SECONDS = 300
"""A Bazel server left running (``server=True``) stops by itself after this long idle."""
ACTIONS = 7
"""Spawns of one full build of the workspace: six genrules, and :tool twice (target and tool)."""
EXPECTED = {
    "hello.txt": b"hello from a genrule\n",
    "upper.txt": b"HELLO FROM A GENRULE\n",
    "tool.sh": b'#!/bin/sh\necho "tool read: $(cat "$1")"\n',
    "tool_out.txt": b"tool read: HELLO FROM A GENRULE\n",
    "nested/a/one.txt": b"one\n",
    "nested/b/c/two.bin": b"two\x00\xff\n",
}
"""Every output of the workspace but where.txt, byte for byte, wherever it was built."""


class BazelFailed(AssertionError):
    """A Bazel command failed or hung; the message carries the end of its output."""


def remote_flags(target: str, *extra: str) -> list[str]:
    """The flags a user puts in .bazelrc to build through the worker (see docs/reapi.md)."""
    return [
        f"--remote_executor=grpc://{target}",
        "--spawn_strategy=remote",
        "--genrule_strategy=remote",
        "--noremote_local_fallback",
        "--disk_cache=",
        # Actions get a fixed PATH, not the caller's: the same action digest wherever Bazel runs.
        "--incompatible_strict_action_env",
        *extra,
        "//...",
    ]


@dataclass
class BazelRun:
    """What one Bazel command printed and how it ended."""

    argv: list[str]
    returncode: int
    output: str

    def processes(self) -> dict[str, int]:
        """Bazel's summary of the spawns it ran, e.g. ``{"remote cache hit": 7, "internal": 1}``,
        read from the line ``INFO: 8 processes: 7 remote cache hit, 1 internal.``"""
        match = re.search(r"INFO: \d+ process(?:es)?: (.*?)\.?$", self.output, re.MULTILINE)
        if match is None:
            return {}
        counts: dict[str, int] = {}
        for part in match.group(1).split(", "):
            number, _, kind = part.partition(" ")
            counts[kind] = int(number)
        return counts


@dataclass
class Bazel:
    """A copy of the test workspace and a Bazel whose every cache lives under ``root``.

    Commands run with ``--batch`` (no server outlives a command) unless ``server``, and read
    only the system rc file (Debian's package names its install base there); the output user
    root (output base, repository cache) and HOME are under ``root``, and no disk cache is
    used, so nothing is shared with another run.
    """

    binary: str
    root: Path
    server: bool = False
    """Keep a Bazel server between commands (as users do), stopped by ``shutdown`` or after
    ``IDLE_SECONDS`` idle; by default every command runs with ``--batch``."""
    workspace: Path = field(init=False)
    _env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.workspace = self.root / "workspace"
        shutil.copytree(WORKSPACE, self.workspace)
        home = self.root / "home"
        home.mkdir()
        self._env = {**os.environ, "HOME": str(home)}

    @property
    def output_user_root(self) -> Path:
        return self.root / "output_user_root"

    def __call__(self, command: str, *flags: str, check: bool = True) -> BazelRun:
        """Run ``bazel <command> <flags>`` in the workspace; BazelFailed unless it exits 0 (``check``)."""
        argv = [
            self.binary,
            f"--output_user_root={self.output_user_root}",
            f"--max_idle_secs={IDLE_SECONDS}" if self.server else "--batch",
            "--nohome_rc",
            "--noworkspace_rc",
            command,
            *flags,
        ]
        # Its own session, so that a command that hangs is killed with every process it started.
        proc = subprocess.Popen(
            argv,
            cwd=self.workspace,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=BAZEL_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            message = f"bazel {command} took more than {BAZEL_SECONDS} s:\n{output[-4000:]}"
            raise BazelFailed(message) from None
        run = BazelRun(argv=argv, returncode=proc.returncode, output=output)
        if check and run.returncode != 0:
            raise BazelFailed(f"bazel {command} failed (exit {run.returncode}):\n{output[-6000:]}")
        return run

    def shutdown(self) -> None:
        """Stop this Bazel's server, if one runs (a no-op with ``--batch``)."""
        if self.server:
            self("shutdown")

    def output(self, path: str) -> bytes:
        """The bytes of ``bazel-bin/<path>`` as the last build left them."""
        return (self.workspace / "bazel-bin" / path).read_bytes()

    def outputs(self) -> dict[str, bytes]:
        """The bytes of every output EXPECTED names, as the last build left them."""
        return {path: self.output(path) for path in EXPECTED}

    def where(self) -> tuple[int, list[bytes]]:
        """The user id where.txt's action ran as, and the argv of process 1 where it ran."""
        uid, _, cmdline = self.output("where.txt").partition(b"\n")
        return int(uid), cmdline.rstrip(b"\0").split(b"\0")

    def survivors(self) -> list[int]:
        """Pids of processes still running with this Bazel's output user root on their command line."""
        marker = str(self.output_user_root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
        return found
