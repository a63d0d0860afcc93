"""The log cap and the disk limit on a real Docker daemon: a held container really stops writing."""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import TEST_LIMITS, docker_executor, gone_within, new_worker_id, remove_labelled, run_command

from expbuild_worker.execution.decorators import DiskLimitingExecutor, LogLimitingExecutor
from expbuild_worker.model import ExecutionStatus, ResourceLimit

pytestmark = pytest.mark.docker

MiB = 1 << 20
CAP = 1 * MiB
PIECE = 65536

WRITER = (
    f"s=$(head -c {PIECE} /dev/zero | tr '\\0' x); n=0; "
    "while :; do n=$((n+1)); echo $n > /work/progress.new; mv /work/progress.new /work/progress; "
    'printf %s "$s"; done'
)
"""Writes stdout forever, 64 KiB at a time, recording in /work/progress how many writes it began
(renamed into place: a command killed mid-update never leaves it empty)."""

HELD_BOUND = CAP + 16 * MiB
"""Far more than a held container can write: what the worker reads ahead (4 MiB and one read),
the socket, and the daemon's own copy buffer (about 1 MiB; the log driver is "none", so the daemon
keeps no log). Unheld, the same writer passes this in a fraction of a second."""

DISK_FILL = "while :; do head -c 1048576 /dev/urandom >> /work/fill || exit 3; done"


def _progress(root: Path) -> int:
    text = (root / "progress").read_text().strip() if (root / "progress").exists() else ""
    return int(text or 0)


def test_container_past_the_log_cap_is_held_until_its_timeout(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    """Past the cap the worker stops reading the attached stream and the daemon stops copying,
    so the container's writes block until its timeout instead of running (and costing a core of
    the worker's) at full speed."""
    worker_id = new_worker_id()

    async def main() -> Any:
        async with docker_executor(busybox_image, worker_id=worker_id) as ex:
            limited = LogLimitingExecutor(ex, max_bytes_per_stream=CAP)
            return await run_command(limited, tmp_path, ["sh", "-c", WRITER], stop_after=4)  # type: ignore[arg-type]

    try:
        ran = asyncio.run(main())
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)
    assert ran.status is ExecutionStatus.TIMED_OUT
    assert len(ran.stdout) == CAP
    summary = ran.outcome.stdout
    assert summary is not None and summary.truncated
    assert summary.size_bytes <= HELD_BOUND  # what the worker read
    assert _progress(tmp_path) * PIECE <= HELD_BOUND  # what the container managed to write
    assert "its output was no longer read from then on, so its writes blocked" in ran.outcome.message


def test_container_a_little_over_the_cap_completes(busybox_image: str, tmp_path: Path) -> None:
    """A container that writes a bit more than the cap and exits is not held until a timeout:
    its exit is watched while its output is held, and every byte is counted."""
    size = CAP + 300_000

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            limited = LogLimitingExecutor(ex, max_bytes_per_stream=CAP)
            return await run_command(limited, tmp_path, ["head", "-c", str(size), "/dev/zero"], stop_after=60)  # type: ignore[arg-type]

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED and ran.outcome.exit_code == 0
    assert len(ran.stdout) == CAP
    assert ran.outcome.stdout is not None and ran.outcome.stdout.size_bytes == size


def test_container_log_cap_with_end_action_ends_it_at_once(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    """With on_log_limit = "end-action" a runaway container ends OUTPUT_LIMIT_EXCEEDED long before
    its 60 s timeout, killed by SIGTERM (not an exit code of 143), and the container is gone."""
    worker_id = new_worker_id()

    async def main() -> Any:
        async with docker_executor(busybox_image, worker_id=worker_id) as ex:
            limited = LogLimitingExecutor(ex, max_bytes_per_stream=CAP, end_action=True)
            return await run_command(limited, tmp_path, ["sh", "-c", WRITER], stop_after=60)  # type: ignore[arg-type]

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.OUTPUT_LIMIT_EXCEEDED
    assert ran.outcome.signal == signal.SIGTERM and ran.outcome.exit_code is None
    assert len(ran.stdout) == CAP
    assert ran.outcome.message.startswith(
        "stdout reached the log cap of 1048576 bytes (execution.max_log_bytes_per_stream); "
        'execution.on_log_limit is "end-action"'
    )
    try:
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)


def test_container_filling_its_work_directory_ends_disk_limit_exceeded(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    """With bind I/O the container writes to the action directory on this machine: past
    limits.disk_bytes it is stopped (well before its 60 s timeout), the result says so, and the
    container is removed."""
    worker_id = new_worker_id()
    limits = dataclasses.replace(TEST_LIMITS, disk_bytes=16 * MiB)

    async def main() -> Any:
        async with docker_executor(busybox_image, worker_id=worker_id, io_mode="bind") as ex:
            watched = DiskLimitingExecutor(ex, interval_seconds=0.2)
            return await run_command(watched, tmp_path, ["sh", "-c", DISK_FILL], limits=limits, stop_after=60)  # type: ignore[arg-type]

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.DISK_LIMIT_EXCEEDED
    assert ran.outcome.signal == signal.SIGTERM
    assert "while the command ran, more than limits.disk_bytes (16777216 bytes)" in ran.outcome.message
    try:
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)


@pytest.mark.parametrize(
    ("io_mode", "enforced"), [("bind", True), ("archive", False)], ids=["bind", "archive"]
)
def test_disk_limit_is_claimed_only_with_bind_io(busybox_image: str, io_mode: str, enforced: bool) -> None:
    """With archive I/O the command writes to a volume on the daemon that the watcher cannot see
    (and this daemon's storage driver has no per-container quota), so DISK is not claimed there."""

    async def main() -> Any:
        async with docker_executor(busybox_image, io_mode=io_mode) as ex:
            return await DiskLimitingExecutor(ex, interval_seconds=1).capabilities()

    caps = asyncio.run(main())
    assert (ResourceLimit.DISK in caps.enforced_limits) is enforced
    assert (ResourceLimit.DISK in caps.unenforced_limits) is not enforced
