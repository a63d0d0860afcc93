"""Starting a command as a plain process: argv[0] lookup, rlimits, cgroup entry, pipes and the spawn."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import resource
import signal
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.errors import InternalError

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


@dataclass(frozen=True, slots=True)
class Child:
    """A started command; the caller owns every descriptor here and must close it."""

    popen: subprocess.Popen[bytes]
    pid: int
    pidfd: int
    stdout_fd: int
    stderr_fd: int
    stdin_fd: int | None  # None when stdin is /dev/null


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


def spawn(
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
) -> Child:
    """Start ``argv`` in its own session with piped stdout/stderr (and stdin when given).

    ``join`` lists ``cgroup.procs`` files the child enters before exec (so nothing it runs
    escapes a cgroup limit); they must be writable by ``user`` when one is given. ``user``
    (uid, gid) runs the command as that user and group with no supplementary groups (the
    worker must be root); None runs it as the worker's own user. Raises SpawnFailure when the
    command cannot be started (missing, not executable, bad working directory, cgroup refused)
    and InternalError when the worker itself runs out of descriptors.
    Without rlimits or ``join`` CPython spawns with vfork (fast); a preexec_fn forces a full
    fork (here ~1.5 ms more), so one is passed only when a limit must be applied before exec.
    """
    argv0 = argv[0]
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
        _close_all(mine + theirs)
        raise InternalError(f"could not create pipes for {argv0!r}: {err.strerror}") from err
    try:
        popen = subprocess.Popen(
            list(argv),
            executable=executable,
            stdin=in_r,
            stdout=out_w,
            stderr=err_w,
            cwd=str(cwd),
            env=dict(environment),
            start_new_session=True,
            close_fds=True,
            user=user[0] if user is not None else None,
            group=user[1] if user is not None else None,
            extra_groups=[] if user is not None else None,
            # Only cgroup writes and setrlimit run in the forked child; CPython's fork hooks make
            # that safe next to threads.
            preexec_fn=_prepare_child(join, rlimits) if join or rlimits else None,  # noqa: PLW1509
        )
    except (OSError, ValueError, subprocess.SubprocessError) as err:
        _close_all(mine)
        raise SpawnFailure(
            _describe(err, argv0=argv0, cwd=str(cwd), working_directory=working_directory)
        ) from err
    finally:
        _close_all(theirs)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as err:
        _kill_and_reap(popen)
        _close_all(mine)
        raise InternalError(f"could not watch process {popen.pid} ({argv0!r}): {err.strerror}") from err
    for fd in mine:
        os.set_blocking(fd, False)
    return Child(popen=popen, pid=popen.pid, pidfd=pidfd, stdout_fd=out_r, stderr_fd=err_r, stdin_fd=in_w)


def _prepare_child(join: Sequence[str], rlimits: Sequence[Rlimit]) -> Callable[[], None]:
    """What the forked child does before exec: enter its cgroups (``0`` = the writer), set rlimits."""
    paths = tuple(join)
    pairs = [(limit.resource, limit.value) for limit in rlimits]

    def prepare() -> None:
        for path in paths:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for kind, value in pairs:
            resource.setrlimit(kind, (value, value))

    return prepare


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


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
