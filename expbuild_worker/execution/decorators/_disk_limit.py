"""Enforce ``limits.disk_bytes`` by measuring the action directory while the command runs."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import os
import stat
import threading
from collections.abc import AsyncGenerator
from pathlib import Path

from expbuild_worker.execution.decorators._base import ExecutorDecorator
from expbuild_worker.execution.executor import Command, Executor, StopSignal
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorEvent,
    ResourceLimit,
    RunOutcome,
    Started,
)

MAX_ENTRIES = 1_000_000
"""Entries one measurement visits at most. A directory holding more is over any disk limit: each
entry costs an inode and directory space on the shared disk, and measuring it costs a thread."""

_SCAN_THREADS = 2
"""Measurements of all actions share this many threads: a large tree slows its own checks, never
the event loop or the default executor."""


class Halted(Exception):
    """The measurement was abandoned (the action ended)."""


@dataclasses.dataclass(frozen=True, slots=True)
class Measurement:
    """Bytes on disk under a directory; ``entries_exceeded`` when it holds more than were counted."""

    size_bytes: int
    entries: int
    entries_exceeded: bool = False


def measure(
    root: Path,
    *,
    stop_above: int | None = None,
    max_entries: int = MAX_ENTRIES,
    halt: threading.Event | None = None,
) -> Measurement:
    """Bytes ``root`` holds on disk: ``st_blocks * 512`` of every entry, hard-linked files once.

    Symlinks are never followed and other file systems (mounts under ``root``) never entered, so a
    link to ``/`` costs its own few bytes, not the host's disk. A sparse file costs only the blocks
    it has. Bounded in work: it stops as soon as the total passes ``stop_above`` (the answer is
    then known), and after ``max_entries`` entries (``entries_exceeded``). Entries that vanish or
    cannot be read while the command runs are skipped. Raises ``Halted`` when ``halt`` is set.
    Its own walk rather than ``fs.directories``: it stats every entry, not only directories.
    """
    try:
        top = os.lstat(root)
    except FileNotFoundError:
        return Measurement(0, 0)
    device = top.st_dev
    total = top.st_blocks * 512
    entries = 1
    seen: set[tuple[int, int]] = set()
    pending = [os.fspath(root)] if stat.S_ISDIR(top.st_mode) else []
    while pending:
        if halt is not None and halt.is_set():
            raise Halted
        try:
            scanner = os.scandir(pending.pop())
        except OSError:  # vanished, or made unreadable by the command
            continue
        with scanner:
            for entry in scanner:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if st.st_dev != device:
                    continue
                entries += 1
                if entries > max_entries:
                    return Measurement(total, entries - 1, entries_exceeded=True)
                if stat.S_ISDIR(st.st_mode):
                    pending.append(entry.path)
                elif st.st_nlink > 1:
                    key = (st.st_dev, st.st_ino)
                    if key in seen:
                        continue
                    seen.add(key)
                total += st.st_blocks * 512
                if stop_above is not None and total > stop_above:
                    return Measurement(total, entries)
    return Measurement(total, entries)


class DiskLimitingExecutor(ExecutorDecorator):
    """Stops an action whose directory (``command.root``) holds more than ``limits.disk_bytes``.

    From the inner executor's ``Started`` event the directory is measured every
    ``interval_seconds`` on one of a few threads of this decorator (``measure``: bytes really on
    disk, hard links once, symlinks never followed, bounded in work), and once more when the
    command has ended. Over the limit while it runs, a stop is requested with reason
    DISK_LIMIT_EXCEEDED (the executor kills it and reports that status); over the limit at the
    end, a completed command's result becomes DISK_LIMIT_EXCEEDED, exit code kept. The message
    names the limit and the size measured. Between two checks a command can write at full
    speed, so the disk needs headroom of one interval's worth of writes per action.

    What this covers: everything the command writes where the action directory is, which is
    the host executor's working tree and, for the Docker executor with ``io_mode = "bind"``,
    the bind-mounted ``/work``. A container's other writable places are bounded elsewhere: its
    ``/tmp`` is a tmpfs of ``tmpfs_size_bytes`` (counted against its memory limit) and its root
    file system is read-only by default. With ``io_mode = "archive"`` the command writes to a
    volume on the Docker daemon, which this decorator cannot see; the daemon's own per-container quota
    (``storage_opt size``) needs overlay2 on XFS with project quotas, which the daemons we run
    on do not have. An inner executor says so by listing DISK among its unenforced limits, and
    then this decorator does not claim it.
    """

    def __init__(self, inner: Executor, *, interval_seconds: float, max_entries: int = MAX_ENTRIES) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        super().__init__(inner)
        self.interval_seconds = interval_seconds
        self.max_entries = max_entries
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=_SCAN_THREADS, thread_name_prefix="expbuild-disk"
        )

    async def capabilities(self) -> ExecutorCapabilities:
        caps = await self.inner.capabilities()
        if ResourceLimit.DISK in caps.unenforced_limits:
            return caps
        return dataclasses.replace(
            caps,
            enforced_limits=caps.enforced_limits | {ResourceLimit.DISK},
            details={
                **caps.details,
                "disk_limit": (
                    f"the action directory's blocks on disk, measured every {self.interval_seconds:g}s "
                    "and at the end"
                ),
            },
        )

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        limit = command.limits.disk_bytes
        watch = _Watch(root=command.root, limit=limit, stop=stop) if limit is not None else None
        events = self.inner.execute(command, stop)
        watcher: asyncio.Future[None] | None = None
        try:
            async for event in events:
                if watch is not None and isinstance(event, Started) and watcher is None:
                    watcher = asyncio.ensure_future(self._watch(watch))
                if watch is not None and isinstance(event, RunOutcome):
                    if watcher is not None:
                        watcher.cancel()
                    yield await self._judge(event, watch)
                else:
                    yield event
        finally:
            if watch is not None:
                watch.halt.set()
            if watcher is not None:
                watcher.cancel()
            with contextlib.suppress(RuntimeError):
                await events.aclose()

    async def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        await self.inner.close()

    async def _measure(self, watch: _Watch) -> Measurement:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._pool,
            lambda: measure(
                watch.root, stop_above=watch.limit, max_entries=self.max_entries, halt=watch.halt
            ),
        )

    async def _watch(self, watch: _Watch) -> None:
        """Measure every interval until over the limit (then request the stop) or stopped."""
        while watch.stop.reason is None:
            try:
                found = await self._measure(watch)
            except Halted:
                return
            if _exceeds(found, watch.limit):
                watch.over = found
                watch.stop.request(ExecutionStatus.DISK_LIMIT_EXCEEDED)
                return
            await asyncio.sleep(self.interval_seconds)

    async def _judge(self, outcome: RunOutcome, watch: _Watch) -> RunOutcome:
        """The outcome with the disk limit's verdict: the reason of our own stop, or for a command
        that completed, a last measurement (it may have written its fill since the last check)."""
        status = outcome.status
        if (
            watch.over is not None
            and status is ExecutionStatus.DISK_LIMIT_EXCEEDED
            and watch.stop.reason is status
        ):
            return dataclasses.replace(
                outcome, message=_join(_explain(watch.over, watch.limit, ended=False), outcome.message)
            )
        if status is not ExecutionStatus.COMPLETED:
            return outcome
        try:
            found = await self._measure(watch)
        except Halted:
            return outcome
        if not _exceeds(found, watch.limit):
            return outcome
        return dataclasses.replace(
            outcome,
            status=ExecutionStatus.DISK_LIMIT_EXCEEDED,
            message=_join(_explain(found, watch.limit, ended=True), outcome.message),
        )


@dataclasses.dataclass(eq=False)
class _Watch:
    """One action's disk watch: where, how much, the stop to request, what was found over."""

    root: Path
    limit: int
    stop: StopSignal
    halt: threading.Event = dataclasses.field(default_factory=threading.Event)
    over: Measurement | None = None


def _exceeds(found: Measurement, limit: int) -> bool:
    return found.entries_exceeded or found.size_bytes > limit


def _explain(found: Measurement, limit: int, *, ended: bool) -> str:
    when = "when the command ended" if ended else "while the command ran"
    if found.entries_exceeded:
        return (
            f"the action directory held more than {found.entries} files and directories {when}, "
            f"too many to measure against limits.disk_bytes ({limit} bytes)"
        )
    return (
        f"the action directory held at least {found.size_bytes} bytes on disk {when}, "
        f"more than limits.disk_bytes ({limit} bytes)"
    )


def _join(first: str, rest: str) -> str:
    return f"{first}; {rest}" if rest else first
