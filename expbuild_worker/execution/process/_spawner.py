"""The worker's end of the spawner process, which forks commands outside the worker's address space."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from expbuild_worker.errors import InternalError
from expbuild_worker.execution.process import _spawner_program as program

_log = logging.getLogger(__name__)

REPLY_TIMEOUT_SECONDS = 10.0
"""How long a request may wait for its answer before the spawner is taken for hung and replaced."""

START_TIMEOUT_SECONDS = 30.0
"""How long a new spawner may take to say it is ready (a Python start on a loaded machine)."""

PROGRAM = str(Path(program.__file__).resolve())
"""The file the spawner process runs (its command line names it)."""


class SpawnerGone(Exception):
    """The spawner process died or stopped answering; what it was asked may or may not have happened."""


class SpawnRefused(Exception):
    """The spawner could not start the command; ``error`` is the exception its fork or exec raised."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(str(error))
        self.error = error


class Spawner:
    """A small process, started by the worker and killed with it, that forks the commands a full
    fork is needed for: a switch to the unprivileged user, a cgroup entered before exec, rlimits.

    A fork of the worker copies the page tables of its whole address space (gRPC, protobuf, the
    store's index) and runs gRPC's fork handlers; a fork of this process, which has no threads
    and imports only the standard library, is cheap. The spawner reaps a child only when asked
    (``reap``), so the worker still knows when a process group id is safe to signal; it gives
    the worker a pidfd for every child to watch its exit with.

    Every call runs on one thread (the event loop's) and blocks it for one round trip, as an
    in-process spawn does. A spawner that died or hung is noticed by the next call (which fails
    with SpawnerGone) or by ``alive``, and a new one is started by the next ``spawn``; the
    children of a dead spawner die with it (their parent-death signal is SIGKILL), and a
    ``reap`` for one of them raises ChildProcessError: its exit status is lost.
    """

    def __init__(self, *, name: str, helper: Path | None = None) -> None:
        """``helper``: the native helper (``execution/agent``) placed children are, when usable;
        without it they are forked copies of the spawner."""
        self._name = name
        self._helper = str(helper) if helper is not None else "-"
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self.started = 0
        """How many spawner processes this object has started (the first, and each restart)."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def alive(self) -> bool:
        """Whether the spawner runs (False before the first start, and once it died)."""
        if self._process is None:
            return False
        if self._process.poll() is not None:
            self._gone("exited")
            return False
        return True

    def start(self) -> None:
        """Start the spawner unless it runs; raises InternalError when it cannot start."""
        if self.alive():
            return
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # -I -S: no user site, no environment variables, no site-packages; the program uses
            # the standard library only. Started by vfork (no preexec_fn), so no fork of ours.
            argv = [sys.executable, "-I", "-S", "-B", PROGRAM, str(theirs.fileno()), str(os.getpid())]
            process = subprocess.Popen(
                [*argv, self._helper],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={},
                pass_fds=(theirs.fileno(),),
                close_fds=True,
            )
        except OSError as err:
            ours.close()
            raise InternalError(f"could not start the spawner of executor {self._name!r}: {err}") from err
        finally:
            theirs.close()
        self._process, self._sock = process, ours
        self.started += 1
        ours.settimeout(START_TIMEOUT_SECONDS)
        try:
            reply, fds = program.receive(ours)
        except (program.Closed, OSError) as err:
            self._gone("did not start")
            raise InternalError(f"the spawner of executor {self._name!r} did not start: {err!r}") from err
        _close(fds)
        if reply[0] != "ready":
            self._gone("did not start")
            raise InternalError(f"the spawner of executor {self._name!r} did not start: {reply!r}")
        ours.settimeout(REPLY_TIMEOUT_SECONDS)

    def spawn(
        self,
        *,
        argv: Sequence[str],
        executable: str,
        cwd: str,
        environment: dict[str, str],
        fds: Sequence[int],
        user: tuple[int, int] | None,
        join: Sequence[str],
        rlimits: Sequence[tuple[int, int]],
    ) -> tuple[int, int, int | None]:
        """Start a command in its own session: (pid, pidfd, exec status fd). ``fds`` are stdin
        (omitted for /dev/null), stdout and stderr; they stay the caller's.

        A command started in a child placed ahead of need comes back before it has exec'd, with
        an exec status fd the caller owns: ``exec_error`` of what it reads tells whether it
        started. Otherwise that fd is None and the command has exec'd. Raises SpawnRefused with
        the error of the fork or exec, SpawnerGone when the spawner died on the way (then the
        command may have started and died with it), InternalError when no spawner can be started."""
        self.start()
        request = ("spawn", list(argv), executable, cwd, environment, user, list(join), list(rlimits))
        reply, got = self._call(request, fds)
        if reply[0] == "spawned" and len(got) in (1, 2):
            return int(reply[1]), got[0], got[1] if len(got) == 2 else None
        _close(got)
        if reply[0] != "failed":
            raise SpawnerGone(f"unexpected answer {reply!r}")
        raise SpawnRefused(self.exec_error(reply[1:]))

    def exec_error(self, report: Sequence[Any]) -> BaseException:
        """The exception a failed fork or exec reported as (kind, errno, filename, text)."""
        kind, number, filename, text = report
        if kind == "os":
            return OSError(number, os.strerror(number) if number else text, filename)
        if kind == "value":
            return ValueError(text)
        if kind == "subprocess":
            return subprocess.SubprocessError(text)
        return InternalError(f"the spawner of executor {self._name!r} failed: {text}")

    def place(self, joins: Sequence[Sequence[str]]) -> None:
        """Have a child forked ahead of need into each set of cgroups in ``joins`` (their
        ``cgroup.procs``): the next ``spawn`` with the same ``join`` execs in it, so neither the
        fork nor the cgroup migration is on that command's path. One message, not answered:
        the spawner forks while the worker goes on (a child that could not be placed only means
        a forked spawn later). Does nothing when the spawner does not run; raises SpawnerGone
        when the message could not be sent."""
        if not self.alive() or not joins:
            return
        sock = self._sock
        try:
            if sock is None:
                raise OSError("not running")
            program.send(sock, ("place", [list(join) for join in joins]))
        except OSError as err:
            self._gone(f"stopped answering ({err!r})")
            raise SpawnerGone(repr(err)) from err

    def reap(self, pid: int) -> tuple[int, resource.struct_rusage] | None:
        """wait4 ``pid`` without blocking, in the spawner: (status, usage) once it exited, None
        while it runs. Raises ChildProcessError when its status is lost (the spawner that started
        it died, or it was never one of its children)."""
        try:
            reply, got = self._call(("reap", pid), ())
        except SpawnerGone as err:
            raise ChildProcessError(errno.ECHILD, f"the spawner died ({err})") from err
        _close(got)
        if reply[0] == "running":
            return None
        if reply[0] == "reaped":
            return int(reply[1]), resource.struct_rusage(tuple(reply[2]))
        raise ChildProcessError(errno.ECHILD, "not a child of the running spawner")

    def _call(self, request: tuple[Any, ...], fds: Sequence[int]) -> tuple[tuple[Any, ...], list[int]]:
        sock = self._sock
        if sock is None:
            raise SpawnerGone("not running")
        try:
            program.send(sock, request, fds)
            return program.receive(sock)
        except (program.Closed, OSError, ValueError, EOFError, TypeError) as err:
            self._gone(f"stopped answering ({err!r})")
            raise SpawnerGone(repr(err)) from err

    def _gone(self, why: str) -> None:
        """Forget a spawner that died or hung: kill it (by its pid, it is ours) and reap it."""
        process, sock = self._process, self._sock
        self._process = self._sock = None
        if sock is not None:
            sock.close()
        if process is None:
            return
        if process.poll() is None:
            with contextlib.suppress(OSError):
                process.kill()
            process.wait()
        if why != "closed":
            _log.warning(
                "the spawner of executor %r %s; a new one starts with the next command", self._name, why
            )

    def close(self) -> None:
        """Stop the spawner (its children die with it); idempotent."""
        self._gone("closed")


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
