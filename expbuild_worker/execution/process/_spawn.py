"""Starting a command as a plain process: argv[0] lookup, rlimits, cgroup entry, pipes and the spawn."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import logging
import marshal
import os
import resource
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from expbuild_worker.errors import InternalError
from expbuild_worker.execution.process._spawner import SpawnerGone, SpawnRefused, SpawnRequest, exec_error
from expbuild_worker.execution.process._spawner_program import close_all

_log = logging.getLogger(__name__)

GRPC_FORK_SUPPORT = "GRPC_ENABLE_FORK_SUPPORT"
"""gRPC's fork handlers, on by default in grpcio, start threads in a forked child; a child forked
to apply limits before exec then crashed with SIGSEGV about one time in four. The worker process
turns them off (``disable_grpc_fork_handlers``) before grpc is imported, which reads this once."""


def disable_grpc_fork_handlers() -> None:
    """Turn gRPC's fork handlers off for this process; call it before grpc is imported. Commands
    never see it: they get their own environment, never the worker's."""
    os.environ[GRPC_FORK_SUPPORT] = "0"


def grpc_fork_handlers_disabled() -> bool:
    return os.environ.get(GRPC_FORK_SUPPORT, "").strip().lower() in ("0", "false")


class SpawnFailure(Exception):
    """The command never ran; ``str(self)`` is the message its FAILED_TO_START outcome carries."""


@dataclass(frozen=True, slots=True)
class Rlimit:
    """One resource limit set (soft and hard alike) in the child before exec."""

    resource: int
    value: int


Reaper = Callable[[], "tuple[int, resource.struct_rusage] | None"]
"""wait4 of a started command without blocking: (wait status, usage) once it exited, None while
it runs; raises ChildProcessError when its exit status is lost (someone else reaped it)."""

AsyncReaper = Callable[[], "Awaitable[tuple[int, resource.struct_rusage] | None]"]
"""The same, asked of the spawner without blocking the event loop for the round trip."""


class Starter(Protocol):
    """What starts the commands that must be placed before exec (cgroups to enter, a user switch,
    rlimits), so the worker never forks itself: the native helper started by the worker
    (``HelperStarter``), or, where it is not built, the spawner process (``Spawner``). Every
    call runs on the event loop's thread."""

    reaps_here: bool
    """Whether its commands are this process's children (reaped with a plain wait4 here)."""

    joins_as_root: bool
    """Whether its children enter their cgroups before they switch to the command's user (so
    no ``cgroup.procs`` needs to be writable by that user)."""

    resident: bool
    """Whether a child it placed stays in its cgroups after starting a command there, ready for
    the next one (``resident_pid``), until ``forget``."""

    @property
    def pid(self) -> int | None:
        """Its own process, if it has one."""
        ...

    def start(self) -> None:
        """Ready it; raises InternalError when it cannot be."""
        ...

    def alive(self) -> bool: ...

    def place(self, joins: Sequence[Sequence[str]]) -> None:
        """Have a child wait ahead of need in each set of cgroups (their ``cgroup.procs``) in ``joins``."""
        ...

    def forget(self, join: Sequence[str]) -> None:
        """The cgroups of ``join`` will not be used: end the child placed there, if any."""
        ...

    def resident_pid(self, join: Sequence[str]) -> int | None:
        """The resident child in the cgroups of ``join``, if any; safe from any thread."""
        ...

    def spawn(self, command: SpawnRequest) -> asyncio.Future[tuple[int, int, int | None]]:
        """Start ``command``: (pid, pidfd, exec status fd or None), or SpawnRefused."""
        ...

    def reap(self, pid: int) -> tuple[int, resource.struct_rusage] | None: ...

    async def reap_async(self, pid: int) -> tuple[int, resource.struct_rusage] | None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class Child:
    """A started command; the caller owns every descriptor here and must close it, and must
    ``reap`` the process (whoever started it: this process or the spawner). ``started`` takes
    ``exec_status`` (and, when the command did not start, everything else) off its hands."""

    pid: int
    pidfd: int
    stdout_fd: int
    stderr_fd: int
    stdin_fd: int | None  # None when stdin is /dev/null
    reap: Reaper
    exec_status: int | None = None  # placed child: reads end-of-file once exec'd (see ``started``)
    reap_async: AsyncReaper | None = None  # the spawner process's child: ``reap`` without blocking the loop


def resolve_executable(argv0: str, environment: Mapping[str, str], cwd: Path) -> str:
    """Find ``argv0`` as execvp would, but on the command's PATH, never the worker's.

    A name with a slash is returned as is (exec resolves it against the working directory);
    relative PATH entries are relative to the command's working directory, as they would be
    for the command itself. Without PATH, only a path can be run.
    """
    if not argv0:
        raise SpawnFailure("argv[0] is empty")
    if "/" in argv0:
        return argv0
    search = environment.get("PATH")
    if search is None:
        raise SpawnFailure(f"argv[0] {argv0!r} is not a path and the command's environment has no PATH")
    denied: str | None = None
    for entry in search.split(":"):
        candidate = os.path.join(cwd, entry or ".", argv0)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = denied or entry or "."
    if denied is not None:
        raise SpawnFailure(
            f"argv[0] {argv0!r}: permission denied (found in PATH entry {denied!r}, not executable)"
        )
    raise SpawnFailure(f"argv[0] {argv0!r}: not found in the command's PATH {search!r}")


def rlimit(kind: int, value: int) -> Rlimit:
    """An rlimit of ``value`` that never exceeds the worker's own hard limit (setrlimit would refuse)."""
    hard = resource.getrlimit(kind)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    return Rlimit(resource=kind, value=value)


async def spawn(
    *,
    argv: Sequence[str],
    executable: str,
    cwd: Path,
    working_directory: str,
    environment: Mapping[str, str],
    stdin: bytes,
    rlimits: Sequence[Rlimit],
    join: Sequence[str] = (),
    user: tuple[int, int] | None = None,
    starter: Starter,
) -> Child:
    """Start ``argv`` in its own session with piped stdout/stderr (and stdin when given).

    ``join`` lists ``cgroup.procs`` files the child enters before exec (so nothing it runs
    escapes a cgroup limit); they must be writable by ``user`` when one is given, unless the
    starter's children join as root (``Starter.joins_as_root``). ``user``
    (uid, gid) runs the command as that user and group with no supplementary groups (the
    worker must be root); None runs it as the worker's own user. Raises SpawnFailure when the
    command cannot be started (missing, not executable, bad working directory, cgroup refused)
    and InternalError when the worker itself runs out of descriptors.

    Without rlimits, ``join`` or ``user`` CPython spawns here with vfork (fast), and this never
    yields to the event loop. Any of them must be applied between fork and exec, and a full
    fork of the worker costs in proportion to its address space, so such a command is started
    by ``starter`` instead (which execs it in a child placed ahead of need when it has one).
    """
    argv0 = argv[0]
    pipes = CommandPipes.make(argv0, stdin=stdin, user=user)
    in_r, out_w, err_w = pipes.child_ends
    command = SpawnRequest(
        argv=argv,
        executable=executable,
        cwd=str(cwd),
        environment=dict(environment),
        fds=(out_w, err_w) if in_r == subprocess.DEVNULL else (in_r, out_w, err_w),
        user=user,
        join=join,
        rlimits=[(limit.resource, limit.value) for limit in rlimits],
    )
    try:
        return await _launch(command, pipes, starter)
    except BaseException as err:
        close_all(pipes.mine)
        cause = err.error if isinstance(err, SpawnRefused) else err
        if isinstance(cause, (OSError, ValueError, subprocess.SubprocessError)):
            raise SpawnFailure(
                _describe(cause, argv0=argv0, cwd=str(cwd), working_directory=working_directory)
            ) from cause
        if isinstance(err, SpawnerGone):
            raise InternalError(f"the spawner process died while starting {argv0!r}: {err}") from err
        raise


async def _launch(command: SpawnRequest, pipes: CommandPipes, starter: Starter) -> Child:
    """Start ``command`` here (vfork) or by the starter; the command's pipe ends are closed here."""
    try:
        if not _needs_starter(command):
            pid, pidfd, reap = _spawn_here(command)
            return pipes.child(pid, pidfd, reap, None, None)
        answer = starter.spawn(command)
    finally:
        close_all(pipes.theirs)  # the child (or the starter) has its own copies now
    try:
        pid, pidfd, status = await asyncio.shield(answer)
    except asyncio.CancelledError:
        if starter.reaps_here:  # a hand-over still waiting for its helper never happens now
            answer.cancel()
        answer.add_done_callback(functools.partial(_abandon_spawned, starter))  # killed and reaped
        raise
    if pid <= 0 or pidfd < 0:  # a signal to it, or a reap of it, would reach other processes
        close_all([fd for fd in (pidfd, status) if fd is not None and fd >= 0])
        raise InternalError(f"the starter answered process {pid} (pidfd {pidfd}) for {command.argv[0]!r}")
    reap_async = None if starter.reaps_here else functools.partial(starter.reap_async, pid)
    return pipes.child(pid, pidfd, functools.partial(starter.reap, pid), status, reap_async)


def needs_full_fork(user: tuple[int, int] | None, rlimits: Sequence[Rlimit]) -> bool:
    """A user switch or rlimits must be applied between fork and exec (by the starter), never
    in a vfork here."""
    return user is not None or bool(rlimits)


def _needs_starter(command: SpawnRequest) -> bool:
    """A user switch, rlimits or cgroups to enter before exec: the starter's work, not a vfork here."""
    return command.user is not None or bool(command.rlimits) or bool(command.join)


def _abandon_spawned(starter: Starter, answer: asyncio.Future[tuple[int, int, int | None]]) -> None:
    """A spawn given up while the starter answered: kill and reap what it started."""
    if answer.cancelled() or answer.exception() is not None:
        return
    pid, pidfd, status = answer.result()
    if status is not None:
        os.close(status)
    reap = functools.partial(starter.reap, pid)
    _abandon(Child(pid=pid, pidfd=pidfd, stdout_fd=-1, stderr_fd=-1, stdin_fd=None, reap=reap))


@dataclass
class CommandPipes:
    """A command's pipes: the worker's ends (``mine``) and the command's (``theirs``)."""

    mine: list[int]
    theirs: list[int]
    out_r: int
    err_r: int
    in_w: int | None
    child_ends: tuple[int, int, int]  # stdin (subprocess.DEVNULL for none), stdout, stderr

    @classmethod
    def make(cls, argv0: str, *, stdin: bytes, user: tuple[int, int] | None) -> CommandPipes:
        """Raises InternalError when the worker is out of descriptors."""
        mine: list[int] = []  # parent ends, closed on failure
        theirs: list[int] = []  # child ends, always closed here once the child has them
        try:
            out_r, out_w = os.pipe2(os.O_CLOEXEC)
            mine.append(out_r)
            theirs.append(out_w)
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            mine.append(err_r)
            theirs.append(err_w)
            for fd in (out_r, err_r):
                _grow_pipe(fd)
            if user is not None:
                # The command's own ends belong to its user, so it can reopen them by name
                # (/dev/stdout, /dev/stderr, /proc/self/fd/N) as a command of the worker's user can.
                for fd in (out_w, err_w):
                    os.fchown(fd, *user)
            in_r: int = subprocess.DEVNULL
            in_w: int | None = None
            if stdin:
                in_r, in_w = os.pipe2(os.O_CLOEXEC)
                mine.append(in_w)
                theirs.append(in_r)
                if user is not None:
                    os.fchown(in_r, *user)
        except OSError as err:
            close_all(mine + theirs)
            raise InternalError(f"could not create pipes for {argv0!r}: {err.strerror}") from err
        return cls(mine, theirs, out_r, err_r, in_w, (in_r, out_w, err_w))

    def child(
        self, pid: int, pidfd: int, reap: Reaper, status: int | None, reap_async: AsyncReaper | None
    ) -> Child:
        """The started command, owning the worker's ends (made non-blocking)."""
        for fd in self.mine:
            os.set_blocking(fd, False)
        return Child(
            pid=pid,
            pidfd=pidfd,
            stdout_fd=self.out_r,
            stderr_fd=self.err_r,
            stdin_fd=self.in_w,
            reap=reap,
            exec_status=status,
            reap_async=reap_async,
        )


async def started(child: Child, *, argv0: str, cwd: Path, working_directory: str) -> None:
    """Wait, without blocking the event loop, until a command started in a placed child has exec'd.

    Raises SpawnFailure (worded as ``spawn`` words it) when it could not start; the child is then
    killed and reaped in the background and every descriptor of ``child`` is closed (the same on
    cancellation). Returns at once for any other child."""
    fd = child.exec_status
    if fd is None:
        return
    try:
        data = await _read_to_end(fd)
    except BaseException:
        _abandon(child)
        raise
    finally:
        os.close(fd)
    if not data:
        return
    _abandon(child)
    try:
        error = exec_error(marshal.loads(data))
    except (ValueError, EOFError, TypeError):
        error = subprocess.SubprocessError(f"the placed child sent an unreadable error ({len(data)} bytes)")
    if isinstance(error, (OSError, ValueError, subprocess.SubprocessError)):
        raise SpawnFailure(
            _describe(error, argv0=argv0, cwd=str(cwd), working_directory=working_directory)
        ) from error
    raise error


async def _readable(fd: int) -> None:
    """Until ``fd`` is readable (a pipe with data or at end-of-file, a pidfd whose process ended)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _settle, ready)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


async def _read_to_end(fd: int) -> bytes:
    os.set_blocking(fd, False)
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            await _readable(fd)
            continue
        if not chunk:
            return bytes(data)
        data += chunk


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_REAP_DELAYS = (0.0, 0.01, 0.05, 0.2, 1.0, 5.0)
"""Seconds between attempts to reap an abandoned child once its pidfd says it ended."""

_ABANDONED: set[asyncio.Task[None]] = set()
"""Background reaps of abandoned children (held so they are not collected while they run)."""


def _abandon(child: Child) -> None:
    """SIGKILL a child that never ran its command, or whose start was given up, close its
    descriptors, and reap it in the background once it has ended (never blocking the loop).

    The signal goes through the pidfd: a placed child may not have its own process group yet;
    its group too, for what an exec'd command may have started already. Never a pid below 1
    (``killpg(0)`` would be this worker's own group) or without a pidfd."""
    close_all([fd for fd in (child.stdout_fd, child.stderr_fd, child.stdin_fd) if fd is not None])
    if child.pid <= 0 or child.pidfd < 0:  # never so (``_launch`` refuses it); a signal would hit us
        _log.error("not killing process %d (pidfd %d): not a started command", child.pid, child.pidfd)
        return
    with contextlib.suppress(OSError):
        signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(child.pid, signal.SIGKILL)
    if child.reap_async is None:  # one that failed to start has usually ended already
        with contextlib.suppress(ChildProcessError):
            if child.reap() is not None:
                os.close(child.pidfd)
                return
    task = asyncio.get_running_loop().create_task(_reap_when_ended(child))
    _ABANDONED.add(task)
    task.add_done_callback(_ABANDONED.discard)


async def _reap_when_ended(child: Child) -> None:
    try:
        await _readable(child.pidfd)
        for delay in _REAP_DELAYS:
            await asyncio.sleep(delay)
            try:
                if child.reap() is not None:
                    return
            except ChildProcessError:
                return
        _log.warning("process %d ended but could not be reaped", child.pid)
    finally:
        os.close(child.pidfd)


def _spawn_here(command: SpawnRequest) -> tuple[int, int, Reaper]:
    """vfork and exec in this process (no user, cgroup or rlimits to apply before exec):
    (pid, pidfd, reaper). Raises what Popen raises."""
    *stdin, stdout, stderr = command.fds
    popen = subprocess.Popen(
        list(command.argv),
        executable=command.executable,
        stdin=stdin[0] if stdin else subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=command.cwd,
        env=command.environment,
        start_new_session=True,
        close_fds=True,
    )
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as err:
        _kill_and_reap(popen)
        raise InternalError(
            f"could not watch process {popen.pid} ({command.argv[0]!r}): {err.strerror}"
        ) from err

    def reap() -> tuple[int, resource.struct_rusage] | None:
        try:
            pid, status, usage = os.wait4(popen.pid, os.WNOHANG)
        except ChildProcessError:
            popen.returncode = -1  # so that Popen never waits for it again
            raise
        if pid == 0:
            return None
        popen.returncode = os.waitstatus_to_exitcode(status)
        return status, usage

    return popen.pid, pidfd, reap


def _describe(err: BaseException, *, argv0: str, cwd: str, working_directory: str) -> str:
    if isinstance(err, OSError):
        reason = os.strerror(err.errno) if err.errno else str(err)
        if err.filename == cwd:
            return f"working directory {working_directory or '.'!r}: {reason}"
        if err.errno == errno.ENOENT:
            return f"argv[0] {argv0!r}: {reason} (or its #! interpreter is missing)"
        if err.errno == errno.E2BIG:
            return f"argv and environment together are too large for exec on this machine ({reason})"
        if err.errno == errno.ENOEXEC:
            return f"argv[0] {argv0!r}: {reason} (not a binary for this machine and no #! line)"
        return f"argv[0] {argv0!r}: {reason}"
    if isinstance(err, ValueError):
        return f"argv or environment cannot be passed to a process: {err}"
    return f"could not apply resource limits (cgroup or rlimits) before running {argv0!r}: {err}"


PIPE_BYTES = 1 << 20
"""Pipe capacity asked for: a fast writer fills a whole log chunk before it has to wait for us."""


def _grow_pipe(fd: int) -> None:
    """Best effort: the kernel caps the size (fs.pipe-max-size, per-user pipe pages)."""
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


def _kill_and_reap(popen: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(OSError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()
