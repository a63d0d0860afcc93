"""The composition root: a worker that cannot be built leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from test_host_executor import memory_root, needs_cgroups

from expbuild_worker.composition import _action_uids, build_worker
from expbuild_worker.config import HostExecutorConfig, parse_config
from expbuild_worker.errors import ConfigError

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


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid range applies to a root worker only")
@pytest.mark.parametrize(
    ("text", "capacity", "words"),
    [
        ("200000", 4, "expected FIRST-LAST"),
        ("200005-200000", 4, "1 <= FIRST <= LAST"),
        ("0-3", 4, "1 <= FIRST <= LAST"),
        ("200000-200001", 4, "2 uid(s) for up to 4 concurrent actions"),
        ("65530-65540", 2, "belongs to user 'nobody'"),
    ],
)
def test_a_bad_uid_range_is_refused_naming_the_key(text: str, capacity: int, words: str) -> None:
    """Each mistake in run_as_uid_range is a ConfigError naming the key and the problem."""
    config = HostExecutorConfig(run_as_uid_range=text)
    with pytest.raises(ConfigError) as info:
        _action_uids("host", config, capacity=capacity)
    assert "executor.host.run_as_uid_range" in str(info.value) and words in str(info.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="the uid range applies to a root worker only")
def test_a_good_uid_range_is_used_unless_run_as_root() -> None:
    """A range with a uid per slot is taken as given; run_as_root or an empty key turns it off."""
    assert _action_uids("host", HostExecutorConfig(run_as_uid_range="231000-231003"), capacity=4) == range(
        231000, 231004
    )
    assert (
        _action_uids(
            "host", HostExecutorConfig(run_as_uid_range="231000-231003", run_as_root=True), capacity=4
        )
        is None
    )
    assert _action_uids("host", HostExecutorConfig(), capacity=4) is None
