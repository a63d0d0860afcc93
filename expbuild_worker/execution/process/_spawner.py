"""The worker's end of the spawner process, which forks commands outside the worker's address space."""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import logging
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class SpawnRequest:
    """A command for a starter to start in its own session, after entering the cgroups whose
    ``cgroup.procs`` are in ``join``, switching to ``user`` (uid, gid; no supplementary groups)
    and setting ``rlimits`` ((resource, value) pairs, soft and hard alike). ``fds`` are its
    stdin (left out for /dev/null), stdout and stderr."""

    argv: Sequence[str]
    executable: str
    cwd: str
    environment: dict[str, str]
    fds: Sequence[int]
    user: tuple[int, int] | None
    join: Sequence[str]
    rlimits: Sequence[tuple[int, int]]


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

    Every call runs on one thread (the event loop's). ``spawn`` and ``reap_async`` send their
    request and let the loop go on until the answer comes; ``reap`` (for the rare paths that
    must not await: a kill from a ``finally``) blocks for its round trip; ``place`` is never
    answered. Answers come in request order, so each is matched to the oldest request still
    waiting, whichever way it was asked.

    A spawner that died or hung is noticed by the next call (which fails with SpawnerGone) or
    by ``alive``, and a new one is started by the next ``spawn``; the children of a dead
    spawner die with it (their parent-death signal is SIGKILL), and a ``reap`` for one of them
    raises ChildProcessError: its exit status is lost.
    """

    reaps_here = False
    """Its commands are the spawner's children: only the spawner can reap them (a round trip)."""

    joins_as_root = False
    """A forked child enters its cgroups after the user switch (subprocess runs ``preexec_fn``
    then), so their ``cgroup.procs`` must be the command user's."""

    resident = False
    """A placed fork becomes its command: it never stays for the next one."""

    def __init__(self, *, name: str) -> None:
        self._name = name
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._waiting: deque[Callable[[_Reply | BaseException], None]] = deque()  # one per request sent
        self._frame = _FrameReader()
        self._reader_loop: asyncio.AbstractEventLoop | None = None
        self._progress = time.monotonic()  # when the spawner last answered
        self._watchdog: asyncio.TimerHandle | None = None
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
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                env={},
                pass_fds=(theirs.fileno(),),
                close_fds=True,
                # A session of its own: a terminal's Ctrl-C (SIGINT to the worker's process
                # group) is the worker's to handle; the spawner ends with the worker anyway.
                start_new_session=True,
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
        program.close_all(fds)
        if reply[0] != "ready":
            self._gone("did not start")
            raise InternalError(f"the spawner of executor {self._name!r} did not start: {reply!r}")
        ours.setblocking(False)  # answers are read as they come (see _pump); waits use poll
        self._frame = _FrameReader()

    def spawn(self, command: SpawnRequest) -> asyncio.Future[tuple[int, int, int | None]]:
        """Start a command in its own session; the request is sent now (its ``fds`` may be closed
        on return) and the event loop is not blocked for the answer. The future gets (pid,
        pidfd, exec status fd).

        A command started in a child placed ahead of need comes back before it has exec'd, with
        an exec status fd the caller owns: ``exec_error`` of what it reads tells whether it
        started. Otherwise that fd is None and the command has exec'd. The future fails with
        SpawnRefused (the error of the fork or exec) or SpawnerGone (the spawner died on the
        way; the command may have started and died with it); InternalError is raised at once
        when no spawner can be started. A command may be started even if nobody waits any more:
        whoever gives up on the future must still take its result (descriptors to close, a
        process to kill and reap)."""
        self.start()
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[tuple[int, int, int | None]] = loop.create_future()

        def settle(reply: _Reply | BaseException) -> None:
            if loop.is_closed():  # asked on a loop that has ended: nobody can take the command
                if isinstance(reply, tuple) and reply[0][0] == "spawned" and reply[1]:
                    with contextlib.suppress(OSError):
                        signal.pidfd_send_signal(reply[1][0], signal.SIGKILL)
                    program.close_all(reply[1])
                return
            try:
                if isinstance(reply, BaseException):
                    raise reply
                answer.set_result(self._spawned(reply))
            except (SpawnRefused, SpawnerGone) as err:
                answer.set_exception(err)

        c = command
        request = (
            "spawn",
            list(c.argv),
            c.executable,
            c.cwd,
            c.environment,
            c.user,
            list(c.join),
            list(c.rlimits),
        )
        self._send(request, c.fds, settle)
        self._read_on(loop)
        self._expect(answer, loop)
        return answer

    def _spawned(self, reply: _Reply) -> tuple[int, int, int | None]:
        answer, got = reply
        if answer[0] == "spawned" and len(got) in (1, 2):
            return int(answer[1]), got[0], got[1] if len(got) == 2 else None
        program.close_all(got)
        if answer[0] != "failed":  # out of step (or descriptors lost): nothing it says can be trusted
            self._gone(f"gave an unexpected answer {answer!r}")
            raise SpawnerGone(f"unexpected answer {answer!r}")
        raise SpawnRefused(exec_error(answer[1:]))

    def _expect(self, answer: asyncio.Future[Any], loop: asyncio.AbstractEventLoop) -> None:
        """Watch for a hung spawner while ``answer`` waits: one timer for all waiting requests, and
        the clock is the spawner's progress (it works through a burst of requests in turn), not
        a request's age. Silent for REPLY_TIMEOUT_SECONDS with requests waiting: taken for hung."""
        answer.add_done_callback(_retrieved)
        if self._watchdog is None:
            self._watchdog = loop.call_later(REPLY_TIMEOUT_SECONDS, self._watch, loop)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._watchdog = None
        if not self._waiting or self._sock is None:
            return
        quiet = time.monotonic() - self._progress
        if quiet >= REPLY_TIMEOUT_SECONDS:
            self._gone("stopped answering (no answer in time)")
        elif not loop.is_closed():
            self._watchdog = loop.call_later(REPLY_TIMEOUT_SECONDS - quiet, self._watch, loop)

    def place(self, joins: Sequence[Sequence[str]]) -> None:
        """Have a child forked ahead of need into each set of cgroups in ``joins`` (their
        ``cgroup.procs``): the next ``spawn`` with the same ``join`` execs in it, so neither the
        fork nor the cgroup migration is on that command's path. One message, not answered:
        the spawner forks while the worker goes on (a child that could not be placed only means
        a forked spawn later). Does nothing when the spawner does not run; raises SpawnerGone
        when the message could not be sent."""
        if not self.alive() or not joins:
            return
        self._send(("place", [list(join) for join in joins]), (), None)

    def forget(self, join: Sequence[str]) -> None:
        """Nothing to do: a fork placed in those cgroups is killed with them, and the spawner
        reaps it before its next request."""

    def resident_pid(self, join: Sequence[str]) -> int | None:
        return None

    def reap(self, pid: int) -> tuple[int, resource.struct_rusage] | None:
        """wait4 ``pid`` without blocking, in the spawner: (status, usage) once it exited, None
        while it runs. Raises ChildProcessError when its status is lost (the spawner that started
        it died, or it was never one of its children)."""
        try:
            reply = self._call(("reap", pid), ())
        except SpawnerGone as err:
            raise ChildProcessError(errno.ECHILD, f"the spawner died ({err})") from err
        return _reaped(reply)

    async def reap_async(self, pid: int) -> tuple[int, resource.struct_rusage] | None:
        """``reap``, without blocking the event loop for the round trip."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_Reply] = loop.create_future()

        def settle(reply: _Reply | BaseException) -> None:
            if loop.is_closed():
                return
            if isinstance(reply, BaseException):
                answer.set_exception(reply)
            else:
                answer.set_result(reply)

        try:
            self._send(("reap", pid), (), settle)
            self._read_on(loop)
            self._expect(answer, loop)
            reply = await asyncio.shield(answer)
        except SpawnerGone as err:
            raise ChildProcessError(errno.ECHILD, f"the spawner died ({err})") from err
        return _reaped(reply)

    def _send(
        self,
        request: tuple[Any, ...],
        fds: Sequence[int],
        on_reply: Callable[[_Reply | BaseException], None] | None,
    ) -> None:
        """Send ``request``; ``on_reply`` gets its answer (or the error that ended the spawner);
        None for a request that is not answered."""
        sock = self._sock
        if sock is None:
            raise SpawnerGone("not running")
        data = program.frame(request)
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
        try:
            sent = 0
            while sent < len(data):
                try:
                    sent += sock.sendmsg([data[sent:]], ancillary if sent == 0 else [])
                except BlockingIOError:
                    if not _wait_for(sock, select.POLLOUT, deadline):
                        raise TimeoutError("the spawner took no request in time") from None
        except (OSError, ValueError) as err:
            self._gone(f"stopped answering ({err!r})")
            raise SpawnerGone(repr(err)) from err
        if on_reply is not None:
            if not self._waiting:  # the spawner's clock starts when something waits for it
                self._progress = time.monotonic()
            self._waiting.append(on_reply)

    def _call(self, request: tuple[Any, ...], fds: Sequence[int]) -> _Reply:
        """One round trip, blocking: answers to earlier ``reap_async`` requests are handed on as
        they pass."""
        got: list[_Reply] = []
        self._send(request, fds, lambda reply: got.append(reply) if isinstance(reply, tuple) else None)
        deadline = time.monotonic() + REPLY_TIMEOUT_SECONDS
        sock = self._sock
        while not got:
            if sock is None or self._sock is not sock:
                raise SpawnerGone("the spawner went away")
            if not self._pump() and not _wait_for(sock, select.POLLIN, deadline):
                self._gone("stopped answering (no answer in time)")
                raise SpawnerGone("no answer in time")
        return got[0]

    def _pump(self) -> bool:
        """Hand every complete answer to its request; False when none was complete."""
        sock = self._sock
        if sock is None:
            return False
        progressed = False
        while True:
            try:
                reply = self._frame.read(sock)
            except (program.Closed, OSError, ValueError, EOFError, TypeError) as err:
                self._gone(f"stopped answering ({err!r})")
                return True
            if reply is None:
                return progressed
            progressed = True
            self._progress = time.monotonic()
            if self._waiting:
                _hand_on(self._waiting.popleft(), reply)
            else:
                program.close_all(reply[1])

    def _read_on(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read answers on ``loop`` as they come (for ``reap_async``)."""
        if self._reader_loop is loop or self._sock is None:
            return
        if self._reader_loop is not None:  # an earlier loop's (a test's asyncio.run, say)
            with contextlib.suppress(Exception):
                self._reader_loop.remove_reader(self._sock.fileno())
        loop.add_reader(self._sock.fileno(), self._pump)
        self._reader_loop = loop

    def _gone(self, why: str) -> None:
        """Forget a spawner that died or hung: kill it (by its pid, it is ours) and reap it."""
        process, sock = self._process, self._sock
        self._process = self._sock = None
        if sock is not None:
            if self._reader_loop is not None:
                with contextlib.suppress(Exception):
                    self._reader_loop.remove_reader(sock.fileno())
            sock.close()
        self._reader_loop = None
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        waiting, self._waiting = self._waiting, deque()
        for on_reply in waiting:
            _hand_on(on_reply, SpawnerGone(why))
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


_Reply = tuple[tuple[Any, ...], list[int]]


def exec_error(report: Sequence[Any]) -> BaseException:
    """The exception a failed fork or exec reported as (kind, errno, filename, text), whether by
    the spawner or by a placed child (a fork of it, or the native helper)."""
    kind, number, filename, text = report
    if kind == "os":
        return OSError(number, os.strerror(number) if number else text, filename)
    if kind == "value":
        return ValueError(text)
    if kind == "subprocess":
        return subprocess.SubprocessError(text)
    return InternalError(f"starting the command failed: {text}")


class _FrameReader:
    """Reassembles the spawner's answers from a non-blocking socket: exactly the bytes of one
    answer are asked for at a time, so the descriptors that come with an answer's first bytes
    are always that answer's."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []
        self._size = -1

    def read(self, sock: socket.socket) -> _Reply | None:
        """One complete answer, or None when the rest has not arrived yet; raises program.Closed
        at end-of-file."""
        while True:
            need = (program.HEADER_SIZE if self._size < 0 else program.HEADER_SIZE + self._size) - len(
                self._buffer
            )
            if need <= 0:
                message = program.unframe(bytes(self._buffer))
                fds, self._fds, self._buffer, self._size = self._fds, [], bytearray(), -1
                return message, fds
            try:
                data, ancillary, flags, _ = sock.recvmsg(
                    need, socket.CMSG_SPACE(program.MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                return None
            self._fds += program.descriptors(ancillary)
            if flags & socket.MSG_CTRUNC:  # descriptors dropped (none left here): out of step
                raise ValueError("descriptors of an answer were lost (is the worker out of descriptors?)")
            if not data:
                raise program.Closed
            self._buffer += data
            if self._size < 0 and len(self._buffer) >= program.HEADER_SIZE:
                self._size = program.frame_size(bytes(self._buffer[: program.HEADER_SIZE]))


def _retrieved(settled: asyncio.Future[Any]) -> None:
    """Mark an answer's error retrieved: one nobody awaits any more is no error."""
    if not settled.cancelled():
        settled.exception()


def _hand_on(on_reply: Callable[[_Reply | BaseException], None], reply: _Reply | BaseException) -> None:
    """Give one request its answer; a failure there is that request's, never the next one's."""
    try:
        on_reply(reply)
    except Exception:
        _log.exception("handling a spawner answer failed")
        if isinstance(reply, tuple):
            program.close_all(reply[1])


def _wait_for(sock: socket.socket, event: int, deadline: float) -> bool:
    """Until ``sock`` is ready for ``event`` (select.POLLIN or POLLOUT); False at ``deadline``."""
    poller = select.poll()
    poller.register(sock, event)
    remaining = deadline - time.monotonic()
    return remaining > 0 and bool(poller.poll(remaining * 1000))


def _reaped(reply: _Reply) -> tuple[int, resource.struct_rusage] | None:
    answer, got = reply
    program.close_all(got)
    if answer[0] == "running":
        return None
    if answer[0] == "reaped":
        return int(answer[1]), resource.struct_rusage(tuple(answer[2]))
    raise ChildProcessError(errno.ECHILD, "not a child of the running spawner")
