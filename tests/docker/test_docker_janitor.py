"""The janitor removes exactly this worker's orphans: at start-up, periodically, containers and cgroups."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import LABEL_WORKER, docker_executor, labelled_containers, new_worker_id, remove_labelled

pytestmark = pytest.mark.docker


def _orphan(client: Any, image: str, worker_id: str, executor: str = "docker") -> str:
    """A running container labelled as if executor ``executor`` of worker ``worker_id`` had died
    while running it."""
    created = client.api.create_container(
        image,
        ["sleep", "600"],
        labels={
            LABEL_WORKER: worker_id,
            "io.expbuild.executor": executor,
            "io.expbuild.action": "left-behind",
        },
        host_config=client.api.create_host_config(network_mode="none", init=True),
    )
    client.api.start(created["Id"])
    return str(created["Id"])


def test_start_removes_this_workers_orphans_only(busybox_image: str, docker_client: Any) -> None:
    """A restarted executor removes what its predecessor left, never another worker's or executor's."""
    mine, theirs = new_worker_id(), new_worker_id()
    try:
        _orphan(docker_client, busybox_image, mine)
        sibling = _orphan(docker_client, busybox_image, mine, executor="docker-gvisor")
        _orphan(docker_client, busybox_image, theirs)

        async def main() -> None:
            async with docker_executor(busybox_image, worker_id=mine):
                pass

        asyncio.run(main())
        assert [c["Id"] for c in labelled_containers(docker_client, mine)] == [sibling]
        assert len(labelled_containers(docker_client, theirs)) == 1
    finally:
        remove_labelled(docker_client, mine)
        remove_labelled(docker_client, theirs)


def test_periodic_sweep_removes_orphans_that_appear_later(busybox_image: str, docker_client: Any) -> None:
    """An orphan appearing while the worker runs is removed by the periodic sweep within a few seconds."""
    worker_id = new_worker_id()
    try:

        async def main() -> bool:
            async with docker_executor(busybox_image, worker_id=worker_id, orphan_sweep_interval_seconds=0.5):
                await asyncio.to_thread(_orphan, docker_client, busybox_image, worker_id)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    if not labelled_containers(docker_client, worker_id):
                        return True
                    await asyncio.sleep(0.2)
                return False

        assert asyncio.run(main())
    finally:
        remove_labelled(docker_client, worker_id)


def test_stale_action_cgroups_are_removed_at_start(busybox_image: str, docker_client: Any) -> None:
    """Per-action cgroups a dead worker left under its own directory are removed at the next start."""
    worker_id = new_worker_id()
    memory = Path("/sys/fs/cgroup/memory")
    info = docker_client.info()
    if info.get("CgroupDriver") != "cgroupfs" or info.get("CgroupVersion") != "1" or not memory.is_dir():
        pytest.skip("needs the daemon's cgroupfs driver on cgroup v1, visible here")
    stale = memory / "expbuild" / worker_id / "docker" / "stale-action"
    try:
        stale.mkdir(parents=True)
    except OSError as err:
        pytest.skip(f"cannot create a cgroup here: {err}")
    try:

        async def main() -> None:
            async with docker_executor(busybox_image, worker_id=worker_id):
                pass

        asyncio.run(main())
        assert not stale.exists()
    finally:
        for path in (stale, stale.parent, stale.parent.parent):
            if path.exists():
                os.rmdir(path)
