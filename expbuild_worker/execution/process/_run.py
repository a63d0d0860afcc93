"""One running command on the event loop: pipe readers, stdin writer, exit watcher and kill logic."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import resource
import select
import signal
import time

from expbuild_worker.execution.cgroups import ActionCgroup, CgroupReading
from expbuild_worker.execution.process._spawn import Child
from expbuild_worker.model import ExecutionStatus, LogChunk, LogStream, ResourceUsage, RunOutcome

READ_SIZE = 64 * 1024
"""Bytes per read() call: one default pipe buffer."""

CHUNK_MAX = 1 << 16
"""Bytes at most per LogChunk: a slow writer's output leaves in small chunks as produced, a fast
writer's in chunks of this size. Measured here (bench_host, 1 GiB of stdout), 64 KiB chunks
stream at 0.76-0.84 of raw gRPC, 128 KiB at 0.49-0.64 and 1 MiB at 0.38-0.44: gRPC writes one
large message far slower than the same bytes in 64 KiB messages."""

HIGH_WATER = 2 * CHUNK_MAX
"""Unsent bytes per stream at which reading pauses, so a slow consumer blocks the command, not our memory."""

DRAIN_SECONDS = 1.0
"""How long to wait for end-of-file after the process group is dead (only a process that escaped
the group and has no cgroup to be found by delays it)."""

FINAL_DRAIN_BYTES = 1 << 20
"""At most this much is read per stream once the drain deadline has passed."""

EMPTY_SECONDS = 2.0
"""How long the end of an action waits for the processes SIGKILLed in its cgroup to exit."""

SETTLE_SECONDS = 0.5
"""How long an abort may block, after the leader is reaped, for the rest of its cgroup to exit."""

REAP_SECONDS = 5.0
"""How long an abort may block waiting for a SIGKILLed process to die before reaping it in the background."""


class _Pipe:
    """One output pipe: the bytes read but not yet emitted, and whether reading is paused."""

    __slots__ = ("fd", "offset", "paused", "pending", "pending_bytes", "stream")

    def __init__(self, fd: int, stream: LogStream) -> None:
        self.fd = fd
        self.stream = stream
        self.offset = 0
        self.pending: collections.deque[bytes] = collections.deque()  # reads, kept uncopied
        self.pending_bytes = 0
        self.paused = False

    def add(self, data: bytes) -> None:
        self.pending.append(data)
        self.pending_bytes += len(data)

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` pending bytes (at least one read's worth); a lone read is passed on uncopied."""
        parts = [self.pending.popleft()]
        size = len(parts[0])
        while self.pending and size + len(self.pending[0]) <= limit:
            part = self.pending.popleft()
            parts.append(part)
            size += len(part)
        self.pending_bytes -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)


class Run:
    """The loop-side state of one child process; every method is called on the loop thread.

    The kill rule: the process group is signalled only while its leader is unreaped (a zombie
    still holds the pid), so the group id can never belong to someone else by then. With a
    ``cgroup``, everything still in it is SIGKILLed once the leader is gone, which also finds
    processes that left the group (setsid), and usage and OOM kills come from its counters.
    """

    def __init__(
        self,
        *,
        child: Child,
        stdin: bytes,
        kill_grace_seconds: float,
        cgroup: ActionCgroup | None = None,
        memory_limit: int | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._child = child
        self._pid = child.pid
        self._pidfd = child.pidfd
        self._grace = kill_grace_seconds
        self._cgroup = cgroup
        self._memory_limit = memory_limit
        self._killed_in_cgroup = 0
        self.pipes = (_Pipe(child.stdout_fd, LogStream.STDOUT), _Pipe(child.stderr_fd, LogStream.STDERR))
        self._stdin_fd = child.stdin_fd if child.stdin_fd is not None else -1
        self._stdin = memoryview(stdin)
        self._stdin_pos = 0
        self._writer_registered = False
        self.wake = asyncio.Event()
        self.started_at = time.time()
        # exec records the spawning process's high-water RSS as the child's (vfork shares our
        # memory), so without a cgroup a peak at or below ours cannot be told apart from ours.
        self._worker_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self.ended_at: float | None = None
        self._status: int | None = None  # wait status
        self._usage: resource.struct_rusage | None = None
        self._reaped = False
        self._reaping: asyncio.Future[tuple[int, resource.struct_rusage] | None] | None = None
        self._stop_reason: ExecutionStatus | None = None
        self._escalated = False
        self._kill_timer: asyncio.TimerHandle | None = None
        self._drain_timer: asyncio.TimerHandle | None = None
        self._drain_deadline: float | None = None
        self._notes: list[str] = []
        self._held = False
        self.released = False

    # ---- starting -----------------------------------------------------------------------

    def start(self) -> None:
        """Watch the pipes and the exit, and begin feeding stdin."""
        for pipe in self.pipes:
            self._loop.add_reader(pipe.fd, self._on_output, pipe)
        self._loop.add_reader(self._pidfd, self._on_exit)
        if self._stdin_fd >= 0:
            self._write_stdin()

    # ---- callbacks ------------------------------------------------------------------------

    def _on_output(self, pipe: _Pipe) -> None:
        # Read what the pipe holds now (up to one chunk) in this turn of the loop, so a fast
        # writer's bytes are batched into large chunks instead of one event per read.
        got = 0
        while got < CHUNK_MAX:
            n = self._read(pipe, READ_SIZE)
            if not n:  # empty for now, or end-of-file (closed)
                break
            got += n
            if pipe.pending_bytes >= HIGH_WATER:
                self._loop.remove_reader(pipe.fd)
                pipe.paused = True
                break
            if n < READ_SIZE:
                break  # the pipe is empty now; another read would only say EAGAIN
        self.wake.set()

    def _read(self, pipe: _Pipe, size: int) -> int | None:
        """Read up to ``size`` bytes into ``pipe``: their count, 0 at end-of-file (the pipe is then
        closed), None when nothing is there yet."""
        try:
            data = os.read(pipe.fd, size)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self._close_pipe(pipe)
            return 0
        pipe.add(data)
        return len(data)

    def _write_stdin(self) -> None:
        try:
            self._stdin_pos += os.write(self._stdin_fd, self._stdin[self._stdin_pos :])
        except BlockingIOError:
            pass
        except OSError:  # EPIPE: the command closed stdin or ended without reading it all
            self._close_stdin()
            return
        if self._stdin_pos >= len(self._stdin):
            self._close_stdin()
        elif not self._writer_registered:
            self._loop.add_writer(self._stdin_fd, self._write_stdin)
            self._writer_registered = True

    def _on_exit(self) -> None:
        self._kill_group(signal.SIGKILL)  # whatever the leader left behind goes with it
        if self._child.reap_async is not None:
            # The spawner's child: reaped without blocking the loop for the round trip. Its pidfd
            # stays readable, so it is not watched meanwhile; from now on the group is never
            # signalled again (the spawner may reap the leader at any moment).
            if self._reaping is None:
                self._loop.remove_reader(self._pidfd)
                self._reaping = asyncio.ensure_future(self._child.reap_async())
                self._reaping.add_done_callback(self._on_reaped)
            return
        if self._reap():
            self._ended()

    def _on_reaped(self, reaping: asyncio.Future[tuple[int, resource.struct_rusage] | None]) -> None:
        if self._reaped:
            return
        if reaping.cancelled():  # the loop is shutting down: reap whenever it is possible
            self._reap_later(f"process {self._pid}: its exit status was not asked for in time")
            return
        error = reaping.exception()
        reaped: tuple[int, resource.struct_rusage | None] | None = (
            self._status_lost(error) if error is not None else reaping.result()
        )
        if reaped is None:  # not over after all (its pidfd said so): watch it again
            self._reaping = None
            if self.released:
                self._reap_later(f"process {self._pid}: reaped in the background")
            else:
                self._loop.add_reader(self._pidfd, self._on_exit)
            return
        self._record(reaped)
        if not self.released:
            self._ended()

    def _ended(self) -> None:
        """The leader is reaped: kill what is left in its cgroup, read its output to the end."""
        self._kill_cgroup()
        if self._held:  # the rest of the output is what the pipes hold: read it to the end
            self._held = False
            for pipe in self.pipes:
                self._resume(pipe)
        self._drain_deadline = self._loop.time() + DRAIN_SECONDS
        self._drain_timer = self._loop.call_at(self._drain_deadline, self.wake.set)
        self.wake.set()

    # ---- stopping -------------------------------------------------------------------------

    def request_stop(self, reason: ExecutionStatus) -> None:
        """SIGTERM the group now and SIGKILL it after the grace period; no-op once the leader exited."""
        if self._reaped or self._reaping is not None or self._stop_reason is not None:
            return
        self._stop_reason = reason
        self._kill_group(signal.SIGTERM)
        self._kill_timer = self._loop.call_later(self._grace, self._escalate)

    def _escalate(self) -> None:
        self._kill_timer = None
        if not self._reaped and self._reaping is None:  # else it is over and its group was killed
            self._escalated = True
            self._kill_group(signal.SIGKILL)

    def abort(self, reason: ExecutionStatus, note: str) -> None:
        """Stop at once (SIGKILL), as when the executor closes; the outcome carries ``reason``."""
        if not self._reaped and self._stop_reason is None:
            self._stop_reason = reason
            self._notes.append(note)
        self.release()

    def _kill_cgroup(self) -> None:
        """SIGKILL whatever is still in the action's cgroup, in or out of the process group."""
        if self._cgroup is not None:
            try:
                self._killed_in_cgroup += self._cgroup.kill()
            except OSError as err:
                self._notes.append(f"could not kill what was left in cgroup {self._cgroup.token}: {err}")

    async def cgroup_emptied(self) -> None:
        """Wait (at most EMPTY_SECONDS) until the processes killed in the cgroup have exited, so the
        counters are final and the cgroup can be removed; returns at once when none was left."""
        if self._cgroup is None or not self._killed_in_cgroup:
            return
        deadline = self._loop.time() + EMPTY_SECONDS
        delay = 0.001
        while not self._cgroup.empty():
            if self._loop.time() >= deadline:
                self._notes.append(
                    f"processes in cgroup {self._cgroup.token} still ran {EMPTY_SECONDS:g}s after SIGKILL"
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
            self._cgroup.kill()  # whatever was forked meanwhile

    def _kill_group(self, sig: signal.Signals) -> None:
        if self._reaped or self._reaping is not None:
            return
        try:
            os.killpg(self._pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:  # a member switched to another user (setuid); nothing more we can do
            pass

    # ---- output ---------------------------------------------------------------------------

    def hold_output(self) -> None:
        """Stop reading both pipes until the command exits: once they are full, its writes block
        (what was read is still delivered). At the exit, what the pipes hold is read as usual."""
        if self._held or self._reaped:
            return
        self._held = True
        for pipe in self.pipes:
            if pipe.fd >= 0 and not pipe.paused:
                self._loop.remove_reader(pipe.fd)
                pipe.paused = True

    def _resume(self, pipe: _Pipe) -> None:
        if pipe.paused and pipe.fd >= 0 and pipe.pending_bytes < HIGH_WATER and not self._held:
            pipe.paused = False
            self._loop.add_reader(pipe.fd, self._on_output, pipe)

    def take_chunk(self, pipe: _Pipe) -> LogChunk | None:
        """The next at most CHUNK_MAX unsent bytes of ``pipe``; resumes reading below the high water."""
        if not pipe.pending:
            return None
        data = pipe.take(CHUNK_MAX)
        chunk = LogChunk(stream=pipe.stream, offset=pipe.offset, data=data)
        pipe.offset += len(data)
        self._resume(pipe)
        return chunk

    @property
    def exited(self) -> bool:
        return self._reaped

    @property
    def pipes_closed(self) -> bool:
        return all(pipe.fd < 0 for pipe in self.pipes)

    def drain_expired(self) -> bool:
        return self._drain_deadline is not None and self._loop.time() >= self._drain_deadline

    def final_drain(self) -> None:
        """Read what is already in the pipes (bounded) and close them; used when end-of-file is late."""
        for pipe in self.pipes:
            budget = FINAL_DRAIN_BYTES
            while pipe.fd >= 0 and budget > 0:
                n = self._read(pipe, min(READ_SIZE, budget))
                if n is None:
                    self._notes.append(
                        f"stopped reading {pipe.stream.value}: still open {DRAIN_SECONDS:g}s after the "
                        "process group was killed (held by a process that left the group?)"
                    )
                    self._close_pipe(pipe)
                    break
                budget -= n
            if pipe.fd >= 0:
                self._notes.append(
                    f"stopped reading {pipe.stream.value} after {FINAL_DRAIN_BYTES} more bytes"
                )
                self._close_pipe(pipe)

    # ---- the end --------------------------------------------------------------------------

    def outcome(self) -> RunOutcome:
        """The RunOutcome for what happened: OOM_KILLED when the cgroup counted an OOM kill (it
        wins over everything), else the stop reason when stopped before the exit, else COMPLETED.

        Usage comes from the cgroup when there is one: every process of the action, including
        those the leader never waited for, peak memory including the page cache it brought in
        (CPU time is never below wait4's, which stands in for a counter the kernel lacks).
        Without a cgroup peak memory is None unless it exceeded the worker's own peak RSS: the
        kernel hands the exec'ing child our high-water mark, so smaller peaks are
        indistinguishable.
        """
        notes = list(self._notes)
        exit_code: int | None = None
        sig: int | None = None
        if self._status is not None:
            if os.WIFEXITED(self._status):
                exit_code = os.WEXITSTATUS(self._status)
            elif os.WIFSIGNALED(self._status):
                sig = os.WTERMSIG(self._status)
        reading = self._cgroup.read() if self._cgroup is not None else None
        usage = self._combined_usage(reading)
        if reading is not None and reading.oom_kills:
            status = ExecutionStatus.OOM_KILLED
            limit = self._memory_limit
            notes.insert(
                0,
                "the kernel killed a process of the command for memory"
                + (f" (memory limit {limit} bytes)" if limit is not None else ""),
            )
        elif self._stop_reason is not None:
            status = self._stop_reason
            how = "SIGTERM, then SIGKILL" if self._escalated else "SIGTERM"
            notes.insert(0, f"stopped ({status.value}): the process group got {how}")
        elif self._status is None:
            status = ExecutionStatus.INTERNAL
        else:
            status = ExecutionStatus.COMPLETED
            if sig is not None:
                notes.insert(0, f"killed by {_signal_name(sig)}")
        return RunOutcome(
            status=status,
            exit_code=exit_code,
            signal=sig,
            message="; ".join(notes),
            usage=usage,
            started_at=self.started_at,
            ended_at=self.ended_at,
        )

    def _combined_usage(self, reading: CgroupReading | None) -> ResourceUsage:
        rusage = self._usage
        user = rusage.ru_utime if rusage is not None else None
        system = rusage.ru_stime if rusage is not None else None
        peak: int | None = None
        if rusage is not None and rusage.ru_maxrss > self._worker_peak_kib:
            peak = rusage.ru_maxrss * 1024
        if reading is not None:
            counted = reading.usage
            user = _larger(user, counted.user_cpu_seconds)
            system = _larger(system, counted.system_cpu_seconds)
            if counted.peak_memory_bytes:
                peak = counted.peak_memory_bytes
        return ResourceUsage(user_cpu_seconds=user, system_cpu_seconds=system, peak_memory_bytes=peak)

    def release(self) -> None:
        """Kill what still runs, reap it, close every descriptor and unregister every callback. Idempotent.

        Safe from a ``finally`` that must not await (generator close, cancellation): a SIGKILLed
        process is waited for synchronously, at most REAP_SECONDS, then reaped in the background;
        the rest of its cgroup gets at most SETTLE_SECONDS more to exit, so the cgroup can go.
        """
        if self.released:
            return
        self.released = True
        for timer in (self._kill_timer, self._drain_timer):
            if timer is not None:
                timer.cancel()
        if not self._reaped and self._reaping is not None:  # it exited; its reap is on its way
            self._kill_cgroup()
            self._settle_cgroup()
        elif not self._reaped:
            self._kill_group(signal.SIGKILL)
            self._kill_cgroup()
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            poller.poll(int(REAP_SECONDS * 1000))
            if not self._reap():
                self._reap_later()
            self._settle_cgroup()
        self._close_stdin()
        for pipe in self.pipes:
            self._close_pipe(pipe)
        self.wake.set()

    def _settle_cgroup(self) -> None:
        if self._cgroup is None or not self._killed_in_cgroup:
            return
        deadline = time.monotonic() + SETTLE_SECONDS
        while not self._cgroup.empty() and time.monotonic() < deadline:
            time.sleep(0.001)

    def _reap(self) -> bool:
        """wait4 the leader if it has exited; True once reaped (or lost to another reaper)."""
        reaped: tuple[int, resource.struct_rusage | None] | None
        try:
            reaped = self._child.reap()
        except ChildProcessError as err:
            reaped = self._status_lost(err)
        if reaped is None:
            return False
        self._record(reaped)
        return True

    def _status_lost(self, err: BaseException) -> tuple[int, None]:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        self._notes.append(f"process {self._pid}: its exit status is lost ({reason})")
        return (-1, None)

    def _record(self, reaped: tuple[int, resource.struct_rusage | None]) -> None:
        """The leader's wait status and usage: it is over, and its descriptors go."""
        self._reaped = True
        self.ended_at = time.time()
        status, usage = reaped
        if usage is not None:
            self._status, self._usage = status, usage
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        self._close_pidfd()
        self._close_stdin()

    def _reap_later(self, note: str | None = None) -> None:
        """Hand the pidfd to a callback that reaps the process whenever it finally dies."""
        pidfd, pid, reap_child = self._pidfd, self._pid, self._child.reap
        if pidfd < 0:
            return
        self._pidfd = -1
        self._notes.append(
            note or f"process {pid} did not die within {REAP_SECONDS:g}s of SIGKILL; reaping it later"
        )
        loop = self._loop

        def reap() -> None:
            with contextlib.suppress(ChildProcessError):
                if reap_child() is None:
                    return
            loop.remove_reader(pidfd)
            os.close(pidfd)

        loop.add_reader(pidfd, reap)

    def _close_pidfd(self) -> None:
        if self._pidfd >= 0:
            self._loop.remove_reader(self._pidfd)
            os.close(self._pidfd)
            self._pidfd = -1

    def _close_stdin(self) -> None:
        if self._stdin_fd >= 0:
            if self._writer_registered:
                self._loop.remove_writer(self._stdin_fd)
                self._writer_registered = False
            os.close(self._stdin_fd)
            self._stdin_fd = -1
            self._stdin.release()

    def _close_pipe(self, pipe: _Pipe) -> None:
        if pipe.fd >= 0:
            self._loop.remove_reader(pipe.fd)
            os.close(pipe.fd)
            pipe.fd = -1
            pipe.paused = False


def _larger(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
