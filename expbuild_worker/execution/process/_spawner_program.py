"""The spawner process's program and the framing both ends share; imports the standard library only."""

from __future__ import annotations

import array
import contextlib
import ctypes
import functools
import gc
import marshal
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Where the native helper is not built (``make agent``; with it the worker starts placed
# commands itself, see _helper_starter.py), the worker forks every command that needs a full
# fork (a user switch, a cgroup to enter or rlimits to set before exec) in this process
# instead of its own: this one has no threads and
# a few MiB of memory, where a fork of the worker copies the page tables of its whole address
# space and runs gRPC's fork handlers. It is started without ``site`` by running this file,
# so none of the worker's packages is ever imported here.
#
# Protocol, over a Unix stream socket pair: each message is a 4-byte big-endian length and a
# ``marshal`` dump of a tuple of plain values (the socket is private to the two processes);
# descriptors travel with a message's first bytes (SCM_RIGHTS). Requests but "place" are
# answered, in order:
#   ("spawn", argv, executable, cwd, env, user, join, rlimits) + fds (stdin or -1 omitted,
#     stdout, stderr)        -> ("spawned", pid) + the child's pidfd,
#                            or ("failed", kind, errno, filename, text)
#   ("reap", pid)            -> ("running",) | ("reaped", status, rusage tuple) | ("unknown",)
#   ("place", [join, ...])   -> no answer (the worker does not wait for it); for each ``join``
#                               a child is forked ahead of need
#                               that enters those cgroups at once and waits; the next "spawn"
#                               with that ``join`` execs in it instead of forking (fork, migration and
#                               this program's own work in the child are off the command's path).
#                               That spawn is answered ("spawned", pid) + its pidfd and an exec
#                               status pipe as soon as the child has the command: the pipe reads
#                               end-of-file once the command runs, or the child's error tuple
#                               (kind, errno, filename, text) when it could not start it.
# A child is reaped only when the worker asks, so the worker knows when its process group id is
# still safe to signal. End-of-file on the socket (the worker went away) ends this process;
# every child has SIGKILL as its parent-death signal, so a spawner that dies takes its
# commands' leaders with it and never leaves a running command unowned.

_HEADER = struct.Struct(">I")
HEADER_SIZE = _HEADER.size
MAX_MESSAGE = 1 << 30
MAX_FDS = 4
_PR_SET_PDEATHSIG = 1


class Closed(Exception):
    """The other end closed the socket."""


def frame(message: tuple[Any, ...]) -> bytes:
    """One message as it goes on the socket: its length, then its marshal dump."""
    data = marshal.dumps(message)
    return _HEADER.pack(len(data)) + data


def frame_size(header: bytes) -> int:
    """The length a frame's header announces; ValueError when it is beyond MAX_MESSAGE."""
    (size,) = _HEADER.unpack(header)
    if size > MAX_MESSAGE:
        raise ValueError(f"message of {size} bytes is too large")
    return int(size)


def unframe(data: bytes) -> tuple[Any, ...]:
    """The message of one whole frame."""
    message: tuple[Any, ...] = marshal.loads(data[_HEADER.size :])
    return message


def descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors SCM_RIGHTS brought."""
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            got = array.array("i")
            got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
            fds.extend(got)
    return fds


def send(sock: socket.socket, message: tuple[Any, ...], fds: Sequence[int] = ()) -> None:
    """Send one message, with ``fds`` attached to its first bytes."""
    frame_bytes = frame(message)
    sent = sock.sendmsg(
        [frame_bytes], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    )
    if sent < len(frame_bytes):
        sock.sendall(frame_bytes[sent:])


def receive(sock: socket.socket) -> tuple[tuple[Any, ...], list[int]]:
    """One message and the descriptors that came with it (close-on-exec); raises Closed at end-of-file."""
    buffer = bytearray()
    fds: list[int] = []
    need = _HEADER.size
    size = -1
    while True:
        data, ancillary, _, _ = sock.recvmsg(
            max(need - len(buffer), 1), socket.CMSG_SPACE(MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        fds += descriptors(ancillary)
        if not data:
            close_all(fds)
            raise Closed
        buffer += data
        if size < 0 and len(buffer) >= _HEADER.size:
            size = frame_size(bytes(buffer[: _HEADER.size]))
            need = _HEADER.size + size
        if size >= 0 and len(buffer) >= need:
            return unframe(bytes(buffer)), fds


@functools.cache
def _prctl() -> Any:
    """libc's prctl, bound once in the spawner before it forks: binding it in a forked child
    costs about 0.1 ms of CPU there (copy-on-write faults), twice per command."""
    return ctypes.CDLL(None, use_errno=True).prctl


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the thread that forked it) ends."""
    _prctl()(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the death signal was set
        os._exit(1)


def _prepare(join: Sequence[str], rlimits: Sequence[tuple[int, int]], parent: int) -> Any:
    """What the forked child does after its user switch and before exec: die with this spawner,
    enter its cgroups (``0`` = the writer), set rlimits."""

    def prepare() -> None:
        _die_with_parent(parent)
        _enter(join)
        for kind, value in rlimits:
            resource.setrlimit(kind, (value, value))

    return prepare


def _enter(join: Sequence[str]) -> None:
    """Move the calling process into each cgroup whose ``cgroup.procs`` is listed."""
    for path in join:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)


_ALL_FDS = (1 << 31) - 1
"""Upper bound for closing every descriptor (``closerange`` uses close_range(2): no cost per fd)."""


def _placed_child(sock: socket.socket, join: Sequence[str], parent: int) -> None:
    """The body of a placed child; never returns (every path ends in exec or ``_exit``)."""
    gc.disable()  # a collection here would touch (and so copy) the spawner's objects for nothing
    try:
        placing: tuple[Any, ...] | None = None
        try:
            _die_with_parent(parent)
            keep = sock.fileno()
            os.closerange(3, keep)
            os.closerange(keep + 1, _ALL_FDS)
            _enter(join)
        except OSError as err:  # reported when the command comes: it must not look as if it ran
            placing = ("subprocess", 0, None, f"entering cgroup {err.filename}: {err.strerror}")
        _exec_in_place(sock, parent, placing)
    finally:
        os._exit(127)


def _exec_in_place(sock: socket.socket, parent: int, placing: tuple[Any, ...] | None) -> None:
    """A placed child: wait for its command, set itself up as subprocess's child would, exec.

    The command comes with its descriptors and, last, the write end of its exec status pipe
    (close-on-exec): on failure (or when ``placing`` says the child could not enter its cgroups)
    the child writes (kind, errno, filename, text) there and exits 127, worded as a forked
    spawn's failure would be; on success exec closes it, which the reader sees as end-of-file."""
    try:
        request, fds = receive(sock)
    except (Closed, OSError, ValueError, EOFError):
        os._exit(0)
    if len(fds) not in (3, 4):
        os._exit(127)
    status = fds[-1]
    reply = placing
    step, filename = "setup", None
    try:
        if reply is None:
            argv, executable, cwd, env, user, rlimits = request
            stdin = fds[0] if len(fds) == 4 else os.open(os.devnull, os.O_RDONLY)
            stdout, stderr = fds[-3:-1]
            os.setsid()
            for target, fd in ((0, stdin), (1, stdout), (2, stderr)):
                os.dup2(fd, target)  # dup2 clears close-on-exec on the copy
            low, high = sorted((sock.fileno(), status))
            os.closerange(3, low)
            os.closerange(low + 1, high)
            os.closerange(high + 1, _ALL_FDS)
            sock.close()
            step, filename = "chdir", cwd
            os.chdir(cwd)
            step, filename = "user", None
            if user is not None:
                os.setgroups([])
                os.setregid(user[1], user[1])
                os.setreuid(user[0], user[0])
                _die_with_parent(parent)  # a change of credentials clears the parent-death signal
            step = "rlimits"
            for kind, value in rlimits:
                resource.setrlimit(kind, (value, value))
            for number in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored here, default for the command
                signal.signal(number, signal.SIG_DFL)
            step, filename = "exec", executable
            if "/" in executable:
                os.execve(executable, argv, env)
            os.execvpe(executable, argv, env)
    except OSError as err:  # as CPython's child reports them: chdir, user switch and exec as OSError
        kind = "os" if step in ("chdir", "user", "exec") else "subprocess"
        reply = (kind, err.errno or 0, filename if kind == "os" else None, str(err))
    except ValueError as err:  # argv or environment exec cannot take (a NUL byte, "=" in a name)
        reply = ("value", 0, None, str(err))
    except BaseException as err:  # reported to the spawner, then this child ends
        reply = ("subprocess", 0, None, f"{type(err).__name__}: {err}")
    with contextlib.suppress(OSError):
        os.write(status, marshal.dumps(reply))
    os._exit(127)


@dataclass
class Placed:
    """A child started ahead of need, waiting in its cgroups for a command (the spawner's fork,
    or the worker's native helper)."""

    pid: int
    sock: socket.socket


def close_all(fds: Sequence[int]) -> None:
    """Close each descriptor, ignoring any that is already closed."""
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def discard(placed: Placed) -> None:
    """End a placed child that will not be used, and reap it."""
    placed.sock.close()  # it was waiting for its command: end-of-file ends it
    with contextlib.suppress(OSError):
        os.kill(placed.pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(placed.pid, 0)


def forget_dead(placed: dict[tuple[str, ...], Placed]) -> None:
    """Drop the placed children that died (their cgroup was killed or removed), reaping them."""
    for key, waiting in list(placed.items()):
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(waiting.pid, os.WNOHANG)[0] == 0:
                continue
        waiting.sock.close()
        del placed[key]


class _Spawner:
    def __init__(self) -> None:
        self.children: dict[int, subprocess.Popen[bytes] | None] = {}  # unreaped, by pid
        self.placed: dict[tuple[str, ...], Placed] = {}
        self.me = os.getpid()

    def place(self, join: Sequence[str]) -> None:
        """Start a child into ``join`` ahead of need; a failure only means a normal spawn later."""
        key = tuple(join)
        if key in self.placed:
            return
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:  # the child: nothing of the spawner's but its own end stays open
            _placed_child(theirs, key, self.me)
        theirs.close()
        self.placed[key] = Placed(pid, ours)

    def reap_placed(self) -> None:
        forget_dead(self.placed)

    def spawn_placed(
        self, request: tuple[Any, ...], fds: list[int]
    ) -> tuple[tuple[Any, ...], list[int]] | None:
        """Exec the request's command in the child placed in its cgroups; None when there is none."""
        _, argv, executable, cwd, env, user, join, rlimits = request
        placed = self.placed.pop(tuple(join), None)
        if placed is None:
            return None
        try:
            pidfd = os.pidfd_open(placed.pid)
        except OSError:  # it died since it was placed (or no descriptor is left): fork as usual
            discard(placed)
            return None
        try:
            status_r, status_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(pidfd)
            discard(placed)
            return None
        try:
            send(placed.sock, (argv, executable, cwd, env, user, rlimits), [*fds, status_w])
        except Exception:  # it died just now, or the message could not go: fork as usual
            close_all((pidfd, status_r))
            discard(placed)
            return None
        finally:
            os.close(status_w)
        placed.sock.close()
        self.children[placed.pid] = None
        return ("spawned", placed.pid), [pidfd, status_r]

    def spawn(self, request: tuple[Any, ...], fds: list[int]) -> tuple[tuple[Any, ...], list[int]]:
        placed = self.spawn_placed(request, fds)
        if placed is not None:
            return placed
        _, argv, executable, cwd, env, user, join, rlimits = request
        if len(fds) == 3:
            stdin, stdout, stderr = fds
        else:
            stdin, (stdout, stderr) = subprocess.DEVNULL, fds
        try:
            popen = subprocess.Popen(
                argv,
                executable=executable,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                cwd=cwd,
                env=env,
                start_new_session=True,
                close_fds=True,
                user=user[0] if user is not None else None,
                group=user[1] if user is not None else None,
                extra_groups=[] if user is not None else None,
                preexec_fn=_prepare(join, rlimits, self.me),  # noqa: PLW1509 (no threads here)
            )
        except OSError as err:
            return ("failed", "os", err.errno or 0, err.filename, str(err)), []
        except ValueError as err:
            return ("failed", "value", 0, None, str(err)), []
        except subprocess.SubprocessError as err:
            return ("failed", "subprocess", 0, None, str(err)), []
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError as err:
            os.killpg(popen.pid, 9)
            popen.wait()
            return ("failed", "pidfd", err.errno or 0, None, str(err)), []
        self.children[popen.pid] = popen
        return ("spawned", popen.pid), [pidfd]

    def reap(self, pid: int) -> tuple[Any, ...]:
        if pid not in self.children:
            return ("unknown",)
        popen = self.children[pid]
        try:
            got, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            del self.children[pid]
            if popen is not None:
                popen.returncode = -1
            return ("unknown",)
        if got == 0:
            return ("running",)
        del self.children[pid]
        if popen is not None:
            popen.returncode = os.waitstatus_to_exitcode(status)
        return ("reaped", status, tuple(usage))


def main(fd: int) -> int:
    _die_with_parent(int(sys.argv[2]))
    os.set_inheritable(fd, False)
    sock = socket.socket(fileno=fd)
    spawner = _Spawner()
    send(sock, ("ready", os.getpid()))
    while True:
        try:
            request, fds = receive(sock)
        except (Closed, ConnectionError):
            return 0
        place: Sequence[Sequence[str]] = ()
        reply: tuple[Any, ...] | None
        try:
            spawner.reap_placed()
            if request[0] == "spawn":
                reply, out = spawner.spawn(request, fds)
            elif request[0] == "reap":
                reply, out = spawner.reap(request[1]), []
            elif request[0] == "place":
                reply, out, place = None, [], request[1]
            else:
                reply, out = ("failed", "protocol", 0, None, f"unknown request {request[0]!r}"), []
        except Exception as err:  # no request may end the spawner (its children would die with it)
            text = f"the spawner failed: {type(err).__name__}: {err}"
            # "place" is never answered, even now: an answer would be taken for the next request's
            reply = None if request[0] == "place" else ("failed", "subprocess", 0, None, text)
            out = []
        finally:
            close_all(fds)
        try:
            if reply is not None:
                send(sock, reply, out)
        except (BrokenPipeError, ConnectionError):
            return 0
        finally:
            close_all(out)
        for join in place:  # unanswered: the worker goes on while this forks
            spawner.place(join)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
