"""Starting placed commands with the native helper, from the worker itself: no spawner round trip."""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import functools
import logging
import marshal
import os
import queue
import resource
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from expbuild_worker.errors import InternalError, UnavailableError
from expbuild_worker.execution.process._spawner import SpawnRefused, SpawnRequest, exec_error
from expbuild_worker.execution.process._spawner_program import Placed, close_all, discard, forget_dead

_log = logging.getLogger(__name__)

SEND_TIMEOUT_SECONDS = 10.0
"""How long handing a command to a placed helper may take before the helper is taken for hung
(it reads as fast as the kernel hands it the body; only a stopped helper takes longer)."""

FINISH_SECONDS = 2.0
"""How long ``close`` waits for a resident helper's start in flight to be over."""

START_END_SECONDS = 10.0
"""How long a resident helper asked to end while it starts a command is given to finish that
start (so the command it cloned is owned) before it is ended anyway."""

PLACER_STOP_SECONDS = 10.0
"""How long ``close`` waits for the placer to finish the helper it is starting."""

_Spawned = tuple[int, int, int | None]
"""(pid, pidfd, exec status fd), as the spawner's ``spawn`` answers."""

_Key = tuple[str, ...]
"""The ``cgroup.procs`` files a placed helper entered."""

_RUN = 2
_TRAILER = struct.Struct("=4si")
"""What a resident helper appends to the exec status pipe: b"pid:" and the command's pid (0: none)."""
_HEADER = struct.Struct("=Iiii")
_PIECE = 65536


class HelperStarter:
    """Starts each command that must be placed before exec (cgroups to enter, a user switch,
    rlimits) in an ``expbuild-agent --placed`` helper the worker itself started.

    The helper is a small static program: ``posix_spawn`` starts it with a vfork (nothing of the
    worker's address space is copied and no fork handler runs), it enters its cgroups, waits
    for its command over a socket pair, sets it up and execs it. The command is this process's
    own child, reaped here with ``wait4``: no round trip to another process.

    ``place`` starts helpers ahead of need on a thread of their own (the placer), so neither
    that start nor the cgroup migration (on cgroup v1 an RCU grace period after a pause) is on a
    command's path, and the event loop is not held meanwhile: a vfork parent waits until its
    child execs, ~0.5 ms here while both cores are busy, and it is called with the GIL released.
    A command whose helper is still being placed waits for it; one with none placed gets a new
    helper at once, on the event loop's thread. A helper's parent-death signal is SIGKILL, kept
    across exec, tied to the thread that started it (the placer, which ends with ``close``, or
    the event loop's): commands end with the worker, however it ends.

    It is the spawner's drop-in for when the helper is built (``Starter`` in ``_spawn``); every
    call but the placer's own runs on the event loop's thread.
    """

    reaps_here = True
    """Its commands are this process's children: ``reap`` is a plain wait4, never a round trip."""

    joins_as_root = True
    """A helper enters its cgroups as soon as it starts, as root, long before the user switch."""

    def __init__(self, helper: Path, *, resident: bool = False) -> None:
        """``resident``: each helper stays in its cgroups after starting a command there, and
        starts the next command handed to the same cgroups (see ``resident``)."""
        self._helper = os.fsencode(helper)
        self.resident = resident
        """Whether its helpers stay in their cgroups: each command is cloned by the helper with
        ``CLONE_PARENT`` (so it is still this process's child, born inside the cgroups, with no
        migration), and the helper waits for the next; ``forget`` ends it."""
        self._starts: dict[_Key, _ResidentStart] = {}  # a resident helper's start in flight
        self._lock = threading.Lock()  # guards _placed and _pending, shared with the placer
        self._placed: dict[_Key, Placed] = {}
        self._pending: dict[_Key, list[Callable[[], None]]] = {}  # being placed -> who waits for it
        self._requests: queue.SimpleQueue[list[_Key] | None] = queue.SimpleQueue()
        self._placer: threading.Thread | None = None
        self._closed = False
        self._start_failed = False  # said once in the log
        self.pid: int | None = None
        """No process of its own (the spawner's has one)."""

    def start(self) -> None:
        self._closed = False

    def alive(self) -> bool:
        return not self._closed

    def place(self, joins: Sequence[Sequence[str]]) -> None:
        """Have the placer start a helper into each set of cgroups in ``joins`` (their
        ``cgroup.procs``) unless one waits there already; forget placed helpers that died
        meanwhile. A helper that cannot be started only means one started for its command."""
        if self._closed:
            return
        with self._lock:
            if not self.resident:  # a resident helper is reaped only when its cgroup is let go:
                forget_dead(self._placed)  # its pid is spared by the cgroup's kill until then
            keys = [key for key in map(tuple, joins) if key not in self._placed and key not in self._pending]
            for key in keys:
                self._pending[key] = []
        if not keys:
            return
        if self._placer is None or not self._placer.is_alive():
            placer = threading.Thread(target=self._place_in_turn, name="helper-placer", daemon=True)
            try:
                placer.start()
            except RuntimeError:  # no thread to be had: each command gets its helper when it comes
                self._placing_done(keys)
                return
            self._placer = placer
        self._requests.put(keys)

    def forget(self, join: Sequence[str]) -> None:
        """The cgroups of ``join`` will not be used (their action failed before its command was
        handed over, or they are being removed): end the helper placed there, now or, while it
        is still being placed, as soon as it is."""
        key = tuple(join)
        with self._lock:
            placed = self._placed.pop(key, None)
            waiters = self._pending.get(key)
            if waiters is not None:
                waiters.append(functools.partial(self.drop, key))
        if placed is not None:
            self._end(key, placed)

    def resident_pid(self, join: Sequence[str]) -> int | None:
        """The resident helper in the cgroups of ``join``: waiting there, or kept alive until
        the start it is making is over (None when there is none, or it is not resident); safe
        from any thread. A cgroup's kill must spare it: killed mid-start, it would leave the
        command it cloned unowned."""
        key = tuple(join)
        with self._lock:
            start = self._starts.get(key)
            placed = (self._placed.get(key) or (start.doomed if start else None)) if self.resident else None
        return placed.pid if placed is not None else None

    def spawn(self, command: SpawnRequest) -> asyncio.Future[_Spawned]:
        """Hand ``command`` to the helper placed for its ``join`` (or a new one). The future gets
        (pid, pidfd, exec status fd); it fails with SpawnRefused when the command cannot be
        passed, InternalError when no helper could take it, UnavailableError once closed. It is
        done on return unless that helper is still being placed. ``command.fds`` may be closed
        on return. The exec status fd reads end-of-file once the command runs, or the helper's
        (kind, errno, filename, text) when it could not start it (see ``exec_error``)."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[_Spawned] = loop.create_future()
        refused = _unpassable(command)
        if refused:
            answer.set_exception(SpawnRefused(ValueError(refused)))
            return answer
        key = tuple(command.join)
        with self._lock:
            waiters = self._pending.get(key)
            if waiters is not None:  # its helper is on its way: hand the command over once it is there
                own = dataclasses.replace(command, fds=_duplicates(command.fds))
                waiters.append(functools.partial(_wake, loop, self._answer, answer, key, own))
                return answer
        self._answer(answer, key, command)
        return answer

    def reap(self, pid: int) -> tuple[int, resource.struct_rusage] | None:
        """wait4 ``pid`` without blocking: (status, usage) once it exited, None while it runs."""
        got, status, usage = os.wait4(pid, os.WNOHANG)
        return None if got == 0 else (status, usage)

    async def reap_async(self, pid: int) -> tuple[int, resource.struct_rusage] | None:
        return self.reap(pid)

    def close(self) -> None:
        """Stop the placer and end every placed helper; later spawns fail with UnavailableError.
        The placer's thread ends here, and with it (their parent-death signal) every command
        that runs in a helper it placed: the runner has stopped its runs before."""
        self._closed = True
        with self._lock:
            starts = list(self._starts.values())
        for start in starts:  # their commands are owned (killed) first
            start.finish(FINISH_SECONDS)
        placer, self._placer = self._placer, None
        if placer is not None:
            self._requests.put(None)
            placer.join(PLACER_STOP_SECONDS)
        with self._lock:
            placed, self._placed = self._placed, {}
        for waiting in placed.values():
            discard(waiting)

    def _place_in_turn(self) -> None:
        """The placer thread: start the helpers asked for, in turn, until ``close``. Nothing ends
        it early (it takes the commands of the helpers it started with it)."""
        while (keys := self._requests.get()) is not None:
            for key in keys:
                placed: Placed | None = None
                if not self._closed:
                    try:
                        placed = _start_helper(self._helper, key, resident=self.resident)
                    except Exception as err:  # only means a helper started for the command
                        if not self._start_failed:
                            self._start_failed = True
                            _log.warning("could not place a native helper ahead of need: %s", err)
                with self._lock:
                    if placed is not None and not self._closed:
                        self._placed[key] = placed
                        placed = None
                if placed is not None:  # closed meanwhile: nobody will take it
                    discard(placed)
                self._placing_done([key])

    def _placing_done(self, keys: Sequence[_Key]) -> None:
        """The keys' helpers are placed (or could not be): wake whoever waits for them."""
        for key in keys:
            with self._lock:
                waiters = self._pending.pop(key, [])
            for wake in waiters:
                try:
                    wake()
                except Exception:
                    _log.exception("handing a command to its placed helper failed")

    def drop(self, key: _Key) -> None:
        """End the helper placed in ``key`` now, if one is (``forget`` also covers one still being placed)."""
        with self._lock:
            placed = self._placed.pop(key, None)
        if placed is not None:
            self._end(key, placed)

    def _end(self, key: _Key, placed: Placed) -> None:
        """End and reap a placed helper; a resident one starting a command is ended once that
        start is over (killed in the middle, the command it cloned would be nobody's)."""
        with self._lock:
            start = self._starts.get(key)
            deferred = start is not None and start.doomed is None
            if start is not None and deferred:
                start.doomed = placed
        if start is None or not deferred:
            discard(placed)
            return
        with contextlib.suppress(RuntimeError):  # a start that never ends (a stopped helper) is cut
            asyncio.get_running_loop().call_later(START_END_SECONDS, self._start_over, key, start)

    def _start_over(self, key: _Key, start: _ResidentStart) -> None:
        """A resident helper's start in ``key`` is over (or cut short): end the helper if that
        was asked meanwhile. Idempotent; a later start in the same cgroup is not touched."""
        with self._lock:
            if self._starts.get(key) is start:
                del self._starts[key]
            doomed, start.doomed = start.doomed, None
        if doomed is not None:
            discard(doomed)

    def _answer(self, answer: asyncio.Future[_Spawned], key: _Key, command: SpawnRequest) -> None:
        if answer.done():
            return
        try:
            if self._closed:
                raise UnavailableError("the executor is closing; the command was not started")
            if self.resident:
                self._hand_resident(answer, key, command)
            else:
                answer.set_result(self._hand(key, command))
        except Exception as err:  # the caller's to word; never left waiting
            answer.set_exception(err)

    def _hand(self, key: _Key, command: SpawnRequest) -> _Spawned:
        """The command to its placed helper (a new one when none waits, or the one that did died)."""
        for attempt in range(2):
            placed = self._helper_for(key, attempt, take=True)
            try:
                return _send(placed, command)
            except (BrokenPipeError, ConnectionError):  # it died while it waited: start another
                discard(placed)
            except OSError as err:
                discard(placed)
                raise InternalError(f"could not hand the command to its placed helper: {err!r}") from err
            except BaseException:
                discard(placed)
                raise
        raise InternalError("two helpers in a row died before they took the command")

    def _helper_for(self, key: _Key, attempt: int, *, take: bool) -> Placed:
        """The helper waiting in ``key`` (first attempt only; ``take`` removes it from the
        placed ones), else a new one started here."""
        with self._lock:
            placed = None
            if attempt == 0:
                placed = self._placed.pop(key, None) if take else self._placed.get(key)
        if placed is None:
            try:
                placed = _start_helper(self._helper, key, resident=self.resident)
            except OSError as err:
                raise InternalError(f"could not start the native helper {self._helper!r}: {err}") from err
            if not take:
                with self._lock:
                    self._placed[key] = placed
        return placed

    def _hand_resident(self, answer: asyncio.Future[_Spawned], key: _Key, command: SpawnRequest) -> None:
        """The command to the resident helper of ``key`` (a new one when none waits, or the one
        that did died). ``answer`` gets (pid, pidfd, exec status) once the command has exec'd,
        or could not; the pid comes last on the exec status pipe (see ``_ResidentStart``)."""
        for attempt in range(2):
            placed = self._helper_for(key, attempt, take=False)
            try:
                status = _send_run(placed, command)
            except (BrokenPipeError, ConnectionError):  # it died while it waited: start another
                self.drop(key)
                continue
            except OSError as err:
                self.drop(key)
                raise InternalError(f"could not hand the command to its resident helper: {err!r}") from err
            except BaseException:
                self.drop(key)
                raise
            start = _ResidentStart(answer, status, functools.partial(self._start_over, key))
            with self._lock:
                self._starts[key] = start
            start.watch()
            return
        raise InternalError("two helpers in a row died before they took the command")


def _wake(
    loop: asyncio.AbstractEventLoop,
    answer_with: Callable[[asyncio.Future[_Spawned], _Key, SpawnRequest], None],
    answer: asyncio.Future[_Spawned],
    key: _Key,
    command: SpawnRequest,
) -> None:
    """On the placer: the helper ``command`` waited for is placed (or could not be); answer on
    the loop, then close the descriptors kept for it. A loop that has ended gets no answer."""

    def answer_and_close() -> None:
        try:
            answer_with(answer, key, command)
        finally:
            close_all(command.fds)

    try:
        loop.call_soon_threadsafe(answer_and_close)
    except RuntimeError:
        close_all(command.fds)


def _send(placed: Placed, command: SpawnRequest) -> _Spawned:
    """The command to a placed helper, which execs it; then that helper's socket is closed."""
    pidfd = os.pidfd_open(placed.pid)  # an unreaped child of ours: its pid cannot be reused
    try:
        status_r = _send_run(placed, command)
    except BaseException:
        os.close(pidfd)
        raise
    placed.sock.close()  # the helper has its command; it reads no more
    return placed.pid, pidfd, status_r


def _send_run(placed: Placed, command: SpawnRequest) -> int:
    """A RUN header with the command's descriptors (and, last, the write end of its exec status
    pipe), then the body; the status pipe's read end."""
    status_r, status_w = os.pipe2(os.O_CLOEXEC)
    try:
        body = _body(command)
        header = _HEADER.pack(_RUN, len(body), len(command.argv), len(command.environment))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [*command.fds, status_w]))]
        placed.sock.sendmsg([header], ancillary)
        for start in range(0, len(body), _PIECE):
            placed.sock.send(body[start : start + _PIECE])
    except BaseException:
        os.close(status_r)
        raise
    finally:
        os.close(status_w)
    return status_r


class _ResidentStart:
    """Waits, on the event loop, for a command handed to a resident helper to exec, and answers
    with (pid, pidfd, exec status). The helper resumes once its clone has exec'd or ended, then
    appends the pid (``_TRAILER``) to the exec status pipe and closes its end: at end-of-file
    the pipe holds the child's error, if any, then the trailer. A command that could not start
    has its error replayed on a fresh pipe for ``started`` to report as a placed helper's; one
    that was never cloned fails the answer with SpawnRefused (FAILED_TO_START); an answer given
    up meanwhile gets its command killed and reaped instead. ``over`` is called at the end."""

    __slots__ = ("_answer", "_data", "_over", "_status", "_watched", "doomed")

    def __init__(
        self, answer: asyncio.Future[_Spawned], status: int, over: Callable[[_ResidentStart], None]
    ) -> None:
        self._answer = answer
        self._status = status
        self._over = over
        self.doomed: Placed | None = None
        """Its helper, once asked to end: ended when this start is over."""
        self._data = bytearray()
        self._watched = False

    def watch(self) -> None:
        os.set_blocking(self._status, False)
        if not self._read():
            asyncio.get_running_loop().add_reader(self._status, self._read)
            self._watched = True

    def finish(self, timeout: float) -> None:
        """Wait (blocking, at most ``timeout`` seconds) for the end of the pipe and answer, as
        ``close`` must before it ends the helpers."""
        if self._status < 0:
            return
        deadline = time.monotonic() + timeout
        while not self._read():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._status], [], [], remaining)[0]:
                self._conclude()  # without a trailer it reads as a helper that ended
                return

    def _read(self) -> bool:
        """Read what the status pipe has; True once it is at end-of-file and answered."""
        try:
            while chunk := os.read(self._status, 65536):
                self._data += chunk
        except BlockingIOError:
            return False
        except OSError:
            pass  # taken as the end: without a trailer it reads as a helper that ended
        self._conclude()
        return True

    def _conclude(self) -> None:
        if self._watched:  # before the close: a vfork child of this process (a helper being
            # started) may hold the pipe a moment longer, and epoll would then keep reporting it
            # under the number a new descriptor gets
            with contextlib.suppress(RuntimeError):  # close() after the loop has ended
                asyncio.get_running_loop().remove_reader(self._status)
            self._watched = False
        os.close(self._status)
        self._status = -1
        try:
            self._answer_with(bytes(self._data))
        except Exception as err:  # out of descriptors or threads: never leave the answer pending
            if not self._answer.done():
                self._answer.set_exception(InternalError(f"could not take over a started command: {err!r}"))
        finally:
            self._over(self)

    def _answer_with(self, data: bytes) -> None:
        mark, pid = _TRAILER.unpack(data[-_TRAILER.size :]) if len(data) >= _TRAILER.size else (b"", 0)
        error: Exception | None = None
        if mark != b"pid:":  # the helper ended before its answer (killed, or out of memory)
            error = SpawnRefused(
                subprocess.SubprocessError(
                    "the helper that starts commands in the action's cgroup ended before it started "
                    "the command (killed, or out of memory under the action's limit)"
                )
            )
        elif pid <= 0:  # nothing was cloned: the error says why
            error = SpawnRefused(_unmarshal_error(data[: -_TRAILER.size]))
        elif not _is_our_child(pid):  # a trailer that is not the helper's: never touch that process
            error = InternalError(
                f"the resident helper named process {pid}, which is not this worker's child"
            )
        if error is not None:
            if not self._answer.done():
                self._answer.set_exception(error)
            return
        try:
            pidfd = os.pidfd_open(pid)  # an unreaped child of ours: its pid cannot be reused
        except OSError as err:  # out of descriptors: the command cannot be watched, so it ends
            _kill_and_reap(pid, None)
            if not self._answer.done():
                self._answer.set_exception(InternalError(f"could not watch process {pid}: {err.strerror}"))
            return
        if self._answer.done():  # given up meanwhile: nobody will run this command
            _kill_and_reap(pid, pidfd)
            return
        failure = data[: -_TRAILER.size]  # the command could not start: why, for ``started``
        try:
            replay = _replay(failure) if failure else None
        except BaseException:
            _kill_and_reap(pid, pidfd)
            raise
        self._answer.set_result((pid, pidfd, replay))


def _is_our_child(pid: int) -> bool:
    """Whether ``pid`` is an unreaped child of this process (running or ended), without reaping it."""
    try:
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _unmarshal_error(data: bytes) -> BaseException:
    """The error a helper wrote as a marshal'd (kind, errno, filename, text) tuple."""
    try:
        return exec_error(marshal.loads(data))
    except (ValueError, EOFError, TypeError):
        return subprocess.SubprocessError(f"the native helper sent an unreadable error ({len(data)} bytes)")


def _replay(data: bytes) -> int:
    """A pipe's read end that holds ``data`` and then reads end-of-file."""
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        os.write(write_end, data)  # an error tuple: far below a pipe's capacity
    finally:
        os.close(write_end)
    return read_end


def _kill_and_reap(pid: int, pidfd: int | None) -> None:
    """End a command nobody waits for any more (it, and its process group once it has one);
    reaped by a thread, since a kill is quick but not instant."""
    with contextlib.suppress(OSError):
        if pidfd is None:
            os.kill(pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    with contextlib.suppress(OSError):
        os.killpg(pid, signal.SIGKILL)
    if pidfd is not None:
        os.close(pidfd)
    threading.Thread(target=_reap_quietly, args=(pid,), name="reap-abandoned", daemon=True).start()


def _reap_quietly(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def _body(command: SpawnRequest) -> bytes:
    """The RUN body in the helper's format: cwd, executable, uid, gid, the rlimit count and pairs,
    argv, then the environment as KEY=VALUE, each NUL-ended (see execution/agent)."""
    uid, gid = command.user if command.user is not None else (-1, -1)
    texts = [command.cwd, command.executable, str(uid), str(gid), str(len(command.rlimits))]
    texts += [str(number) for pair in command.rlimits for number in pair]
    texts += [*command.argv, *(f"{key}={value}" for key, value in command.environment.items())]
    return b"".join(os.fsencode(text) + b"\0" for text in texts)


def _unpassable(command: SpawnRequest) -> str:
    """Why exec could not take the command's texts or environment (CPython's words); '' when it
    can. The helper's NUL-separated format could not carry them either."""
    env = command.environment
    if any("\0" in text for text in [*command.argv, command.executable, command.cwd, *env, *env.values()]):
        return "embedded null byte"
    if any(not key or "=" in key for key in env):
        return "illegal environment variable name"
    return ""


def _start_helper(helper: bytes, key: _Key, *, resident: bool = False) -> Placed:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    copy = -1
    try:
        control = theirs.fileno()
        if control == _CONTROL:  # dup2 onto itself would keep close-on-exec: the helper would lose it
            control = copy = _duplicate(control)
        role = b"--resident" if resident else b"--placed"
        argv = [helper, role, str(os.getpid()).encode(), *map(os.fsencode, key)]
        pid = _posix_spawn(helper, argv, control)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
        if copy >= 0:
            os.close(copy)
    ours.settimeout(SEND_TIMEOUT_SECONDS)
    return Placed(pid, ours)


_CONTROL = 3
"""The descriptor a placed helper reads its command from."""

_LIBC = ctypes.CDLL(None, use_errno=True)
_OPAQUE_BYTES = 1024  # room for posix_spawn_file_actions_t and posix_spawnattr_t (glibc: 80, 336)
_SIGSET_BYTES = 128  # sigset_t
_SETSIGDEF = 0x04  # POSIX_SPAWN_SETSIGDEF, the same in glibc and musl
_SETSIGMASK = 0x08  # POSIX_SPAWN_SETSIGMASK
_SETSID = 0x80  # POSIX_SPAWN_SETSID (glibc 2.26, musl)


def _posix_spawn(path: bytes, argv: Sequence[bytes], control: int) -> int:
    """posix_spawn ``path`` with ``control`` as descriptor 3, in a session of its own (a
    terminal's Ctrl-C or a signal to the worker's process group never reaches a waiting
    helper; the command keeps that session), no signal blocked, SIGPIPE and SIGXFSZ at their
    defaults (this process ignores them) and an empty environment.

    Through ctypes, which releases the GIL for the call: ``os.posix_spawn`` holds it while the
    kernel starts the child, and a vfork parent waits until its child execs."""
    actions = ctypes.create_string_buffer(_OPAQUE_BYTES)
    attributes = ctypes.create_string_buffer(_OPAQUE_BYTES)
    _check(_LIBC.posix_spawn_file_actions_init(actions))
    try:
        _check(_LIBC.posix_spawn_file_actions_adddup2(actions, control, _CONTROL))
        _check(_LIBC.posix_spawnattr_init(attributes))
        try:
            blocked = ctypes.create_string_buffer(_SIGSET_BYTES)
            defaults = ctypes.create_string_buffer(_SIGSET_BYTES)
            _LIBC.sigemptyset(blocked)
            _LIBC.sigemptyset(defaults)
            for number in (signal.SIGPIPE, signal.SIGXFSZ):
                _LIBC.sigaddset(defaults, int(number))
            _check(_LIBC.posix_spawnattr_setsigmask(attributes, blocked))
            _check(_LIBC.posix_spawnattr_setsigdefault(attributes, defaults))
            flags = _SETSIGDEF | _SETSIGMASK | _SETSID
            if _LIBC.posix_spawnattr_setflags(attributes, ctypes.c_short(flags)) == errno.EINVAL:
                # glibc before 2.26 knows no POSIX_SPAWN_SETSID: the helper's own setsid() does it
                _check(_LIBC.posix_spawnattr_setflags(attributes, ctypes.c_short(flags & ~_SETSID)))
            pid = ctypes.c_int(0)
            args = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
            environment = (ctypes.c_char_p * 1)(None)
            _check(_LIBC.posix_spawn(ctypes.byref(pid), path, actions, attributes, args, environment))
            return pid.value
        finally:
            _LIBC.posix_spawnattr_destroy(attributes)
    finally:
        _LIBC.posix_spawn_file_actions_destroy(actions)


def _check(number: int) -> None:
    """posix_spawn and its set-up calls return an errno value, 0 for success."""
    if number:
        raise OSError(number, os.strerror(number))


def _duplicates(fds: Sequence[int]) -> list[int]:
    """Close-on-exec copies of ``fds`` (all or, on failure, none: the copies made are closed)."""
    copies: list[int] = []
    try:
        for fd in fds:
            copies.append(_duplicate(fd))
    except BaseException:
        close_all(copies)
        raise
    return copies


def _duplicate(fd: int) -> int:
    """A close-on-exec copy of ``fd`` above the standard descriptors and the helper's control one."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _CONTROL + 1)
