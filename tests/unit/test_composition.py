"""The composition root: a worker that cannot be built leaves nothing behind."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from test_host_executor import memory_root, needs_cgroups

from expbuild_worker.composition import build_worker
from expbuild_worker.config import parse_config

WORKER = "unit-tests-composition"


@needs_cgroups
def test_a_failed_build_closes_the_executors_it_started(tmp_path: Path) -> None:
    """The host executor starts (and makes its spare cgroups) before the engine finds its work root
    unusable; the failed build closes it again, so none of its cgroups is left."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    config = parse_config(
        {
            "server": {"worker_id": WORKER},
            "execution": {"work_root": str(blocker / "work")},
            "storage": {"path": str(tmp_path / "cas")},
            "executor": {"host": {"type": "host", "cgroups": "required"}},
        }
    )
    with pytest.raises(OSError):
        asyncio.run(build_worker(config))
    assert not (memory_root() / "expbuild" / WORKER).exists()
