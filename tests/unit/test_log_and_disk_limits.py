"""The log cap (hold or end the action) and the disk limit, around the real host executor."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncGenerator, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pytest

from expbuild_worker.execution.decorators import (
    DeadlineExecutor,
    DiskLimitingExecutor,
    ExecutorDecorator,
    LogLimitingExecutor,
)
from expbuild_worker.execution.decorators._disk_limit import measure
from expbuild_worker.execution.executor import Command, Executor, OutputHolding, StopSignal
from expbuild_worker.execution.host import HostExecutor
from expbuild_worker.execution.process._run import CHUNK_MAX, HIGH_WATER
from expbuild_worker.execution.process._spawn import PIPE_BYTES
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    LogChunk,
    LogStream,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    RunOutcome,
    Started,
)

T = TypeVar("T")
MiB = 1 << 20
CAP = 64 * 1024
PIECE = 64 * 1024

WRITER = f"""
import os
n = 0
fd = os.open("progress", os.O_WRONLY | os.O_CREAT)
while True:
    os.write(1, b"x" * {PIECE})
    n += 1
    os.pwrite(fd, b"%012d" % n, 0)
"""
"""Writes stdout forever, 64 KiB at a time, recording in ./progress how many writes went through."""

HOST_BUFFERS = 2 * HIGH_WATER + CHUNK_MAX + PIPE_BYTES
"""The most a held host action can have written past what was streamed: the bytes read ahead of
the consumer (high water, plus one read pass past it) and a full pipe (grown to PIPE_BYTES)."""


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine; the generous timeout turns a hang into a failure."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


def host() -> HostExecutor:
    return HostExecutor(
        kill_grace_seconds=0.2,
        refuse_unenforceable_limits=False,
        default_limits=ResourceLimits(),
        max_limits=ResourceLimits(),
        cgroups="off",
    )


def command(
    root: Path, argv: Sequence[str], *, timeout: float | None = None, disk: int | None = None
) -> Command:
    root.mkdir(parents=True, exist_ok=True)
    return Command(
        execution_id="limits-test",
        argv=list(argv),
        environment={"PATH": "/usr/bin:/bin"},
        root=root,
        working_directory="",
        stdin=b"",
        limits=ResourceLimits(disk_bytes=disk),
        timeout_seconds=timeout,
    )


async def collect(executor: Executor, cmd: Command) -> tuple[RunOutcome, bytes]:
    """Run ``cmd`` to its outcome; the stdout bytes streamed and the outcome."""
    stdout = bytearray()
    outcome: RunOutcome | None = None
    try:
        async for event in executor.execute(cmd, StopSignal()):
            if isinstance(event, LogChunk) and event.stream is LogStream.STDOUT:
                stdout += event.data
            elif isinstance(event, RunOutcome):
                outcome = event
    finally:
        await executor.close()
    assert outcome is not None
    return outcome, bytes(stdout)


def progress(root: Path) -> int:
    text = (root / "progress").read_text() if (root / "progress").exists() else ""
    return int(text or 0)


# ---- measuring a directory ------------------------------------------------------------------


def test_sparse_file_costs_only_the_blocks_it_has(tmp_path: Path) -> None:
    """A 10 GiB sparse file holds no disk: a disk limit must not end an action for its length."""
    with open(tmp_path / "sparse", "wb") as fh:
        fh.truncate(10 << 30)
        fh.seek(5 << 30)
        fh.write(b"x" * 4096)
    found = measure(tmp_path)
    assert found.size_bytes < MiB


def test_hard_links_are_counted_once(tmp_path: Path) -> None:
    """Ten names of one file hold its blocks once; counting them ten times would end actions early."""
    (tmp_path / "f").write_bytes(os.urandom(MiB))
    for i in range(9):
        os.link(tmp_path / "f", tmp_path / f"link{i}")
    found = measure(tmp_path)
    assert MiB <= found.size_bytes < 2 * MiB


def test_symlinks_are_never_followed(tmp_path: Path) -> None:
    """A link to a large tree elsewhere costs the link, not the tree (nor does it walk the host)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "big").write_bytes(os.urandom(4 * MiB))
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(elsewhere)
    (root / "slash").symlink_to("/")
    assert measure(root).size_bytes < MiB


def test_real_blocks_are_counted_through_nested_directories(tmp_path: Path) -> None:
    """Bytes written anywhere under the action directory count against its limit."""
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "data").write_bytes(os.urandom(3 * MiB))
    assert measure(tmp_path).size_bytes >= 3 * MiB


def test_measurement_is_bounded_in_entries(tmp_path: Path) -> None:
    """A tree of countless empty files cannot make the watcher work without end: it says so instead."""
    for i in range(50):
        (tmp_path / f"f{i}").touch()
    found = measure(tmp_path, max_entries=20)
    assert found.entries_exceeded and found.entries == 20


# ---- the log cap ----------------------------------------------------------------------------


def test_host_action_past_the_log_cap_is_held_until_its_timeout(tmp_path: Path) -> None:
    """Past the cap the worker stops reading, so a runaway writer blocks instead of burning a core
    (and the worker's) until its timeout; the result says why it was stopped."""
    root = tmp_path / "a"
    executor = DeadlineExecutor(LogLimitingExecutor(host(), max_bytes_per_stream=CAP))
    outcome, stdout = run(collect(executor, command(root, [sys.executable, "-c", WRITER], timeout=3)))
    assert outcome.status is ExecutionStatus.TIMED_OUT
    assert stdout == b"x" * CAP
    assert outcome.stdout is not None and outcome.stdout.truncated
    assert progress(root) * PIECE <= CAP + HOST_BUFFERS  # unheld, it writes gigabytes in 3 s
    assert "stdout reached the log cap of 65536 bytes (execution.max_log_bytes_per_stream)" in outcome.message


def test_host_action_a_little_past_the_cap_completes_with_every_byte_counted(tmp_path: Path) -> None:
    """A command that writes a bit more than the cap and exits is not held hostage: it completes,
    and the summary counts all it wrote."""
    executor = DeadlineExecutor(LogLimitingExecutor(host(), max_bytes_per_stream=CAP))
    size = CAP + 300_000
    outcome, stdout = run(
        collect(executor, command(tmp_path, ["head", "-c", str(size), "/dev/zero"], timeout=30))
    )
    assert outcome.status is ExecutionStatus.COMPLETED and outcome.exit_code == 0
    assert len(stdout) == CAP
    assert outcome.stdout is not None and outcome.stdout.size_bytes == size


def test_host_action_ends_when_its_log_cap_is_reached_with_end_action(tmp_path: Path) -> None:
    """With on_log_limit = "end-action" a runaway log ends the action at once (well before its
    60 s timeout), OUTPUT_LIMIT_EXCEEDED, and the message says which stream and which setting."""
    executor = DeadlineExecutor(LogLimitingExecutor(host(), max_bytes_per_stream=CAP, end_action=True))
    outcome, stdout = run(collect(executor, command(tmp_path, [sys.executable, "-c", WRITER], timeout=60)))
    assert outcome.status is ExecutionStatus.OUTPUT_LIMIT_EXCEEDED
    assert outcome.signal == signal.SIGTERM and outcome.exit_code is None
    assert stdout == b"x" * CAP
    assert outcome.message.startswith(
        "stdout reached the log cap of 65536 bytes (execution.max_log_bytes_per_stream); "
        'execution.on_log_limit is "end-action"'
    )


class _Unholdable(ExecutorDecorator):
    """The host executor seen through a decorator that does not pass ``hold_output`` on."""


def test_an_executor_that_cannot_hold_is_read_to_the_end_and_counted(tmp_path: Path) -> None:
    """Without a way to hold, every byte is still read and counted: the summary never lies."""
    inner = _Unholdable(host())
    assert not isinstance(inner, OutputHolding)
    executor = LogLimitingExecutor(inner, max_bytes_per_stream=CAP)
    outcome, stdout = run(collect(executor, command(tmp_path, ["head", "-c", str(8 * MiB), "/dev/zero"])))
    assert outcome.status is ExecutionStatus.COMPLETED
    assert len(stdout) == CAP and outcome.stdout is not None and outcome.stdout.size_bytes == 8 * MiB


# ---- the disk limit -------------------------------------------------------------------------

DISK_WRITER = """
import os
with open("fill", "wb") as fh:
    while True:
        fh.write(os.urandom(1 << 20))
        fh.flush()
"""


def test_host_action_writing_past_its_disk_limit_is_stopped(tmp_path: Path) -> None:
    """An action filling the shared disk is stopped while it runs (long before its 60 s timeout),
    DISK_LIMIT_EXCEEDED, and the message names the limit and what was measured."""
    executor = DeadlineExecutor(DiskLimitingExecutor(host(), interval_seconds=0.2))
    cmd = command(tmp_path, [sys.executable, "-c", DISK_WRITER], timeout=60, disk=8 * MiB)
    outcome, _ = run(collect(executor, cmd))
    assert outcome.status is ExecutionStatus.DISK_LIMIT_EXCEEDED
    assert outcome.signal == signal.SIGTERM
    assert "while the command ran, more than limits.disk_bytes (8388608 bytes)" in outcome.message
    assert "the action directory held at least " in outcome.message


def test_a_fill_written_between_two_checks_is_caught_at_the_end(tmp_path: Path) -> None:
    """A command that fills its directory and exits before the next check still ends
    DISK_LIMIT_EXCEEDED (exit code kept): the result never depends on when a check ran."""
    executor = DiskLimitingExecutor(host(), interval_seconds=3600)
    cmd = command(tmp_path, ["/bin/sh", "-c", "head -c 20000000 /dev/urandom > out"], disk=8 * MiB)
    outcome, _ = run(collect(executor, cmd))
    assert outcome.status is ExecutionStatus.DISK_LIMIT_EXCEEDED and outcome.exit_code == 0
    assert "when the command ended, more than limits.disk_bytes (8388608 bytes)" in outcome.message


def test_a_sparse_file_does_not_trip_the_disk_limit(tmp_path: Path) -> None:
    """Only blocks really written count: a 10 GiB sparse file under an 8 MiB limit completes."""
    executor = DiskLimitingExecutor(host(), interval_seconds=0.05)
    script = "truncate -s 10G sparse && sleep 0.3"
    outcome, _ = run(collect(executor, command(tmp_path, ["/bin/sh", "-c", script], disk=8 * MiB)))
    assert outcome.status is ExecutionStatus.COMPLETED and outcome.exit_code == 0


def test_without_a_disk_limit_nothing_is_measured(tmp_path: Path) -> None:
    """An action without limits.disk_bytes writes what it likes (the disk is the store's business)."""
    executor = DiskLimitingExecutor(host(), interval_seconds=0.05)
    cmd = command(tmp_path, ["/bin/sh", "-c", "head -c 20000000 /dev/zero > out"])
    outcome, _ = run(collect(executor, cmd))
    assert outcome.status is ExecutionStatus.COMPLETED


class _ElsewhereWriter:
    """An executor whose commands write somewhere the action directory is not (archive I/O)."""

    name = "elsewhere"
    isolation = IsolationLevel.CONTAINER

    async def readiness(self) -> Readiness:
        return Readiness(True)

    async def capabilities(self) -> ExecutorCapabilities:
        return ExecutorCapabilities(
            name=self.name,
            isolation=self.isolation,
            readiness=Readiness(True),
            enforced_limits=frozenset({ResourceLimit.TIMEOUT}),
            unenforced_limits=frozenset({ResourceLimit.DISK}),
        )

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        yield Started(at=0.0)
        yield RunOutcome(status=ExecutionStatus.COMPLETED, exit_code=0)


@pytest.mark.parametrize(
    ("inner", "claimed"),
    [(host, True), (_ElsewhereWriter, False)],
    ids=["host-executor", "writes-elsewhere"],
)
def test_disk_limit_is_claimed_only_where_it_is_watched(inner: Any, claimed: bool) -> None:
    """Capabilities tell clients the truth: DISK is enforced where the action directory is where the
    command writes, and not where the inner executor says it writes elsewhere."""
    caps = run(DiskLimitingExecutor(inner(), interval_seconds=1).capabilities())
    assert (ResourceLimit.DISK in caps.enforced_limits) is claimed
    assert (ResourceLimit.DISK in caps.unenforced_limits) is not claimed
