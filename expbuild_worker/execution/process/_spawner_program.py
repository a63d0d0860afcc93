"""The spawner process's program and the framing both ends share; imports the standard library only."""

from __future__ import annotations

import array
import ctypes
import marshal
import os
import resource
import socket
import struct
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

# The worker forks every command that needs a full fork (a user switch, a cgroup to enter or
# rlimits to set before exec) in this process instead of its own: this one has no threads and
# a few MiB of memory, where a fork of the worker copies the page tables of its whole address
# space and runs gRPC's fork handlers. It is started without ``site`` by running this file,
# so none of the worker's packages is ever imported here.
#
# Protocol, over a Unix stream socket pair: each message is a 4-byte big-endian length and a
# ``marshal`` dump of a tuple of plain values (the socket is private to the two processes);
# descriptors travel with a message's first bytes (SCM_RIGHTS). Requests are answered in order:
#   ("spawn", argv, executable, cwd, env, user, join, rlimits) + fds (stdin or -1 omitted,
#     stdout, stderr)        -> ("spawned", pid) + the child's pidfd,
#                            or ("failed", kind, errno, filename, text)
#   ("reap", pid)            -> ("running",) | ("reaped", status, rusage tuple) | ("unknown",)
# A child is reaped only when the worker asks, so the worker knows when its process group id is
# still safe to signal. End-of-file on the socket (the worker went away) ends this process;
# every child has SIGKILL as its parent-death signal, so a spawner that dies takes its
# commands' leaders with it and never leaves a running command unowned.

_HEADER = struct.Struct(">I")
MAX_MESSAGE = 1 << 30
_MAX_FDS = 4
_PR_SET_PDEATHSIG = 1


class Closed(Exception):
    """The other end closed the socket."""


def send(sock: socket.socket, message: tuple[Any, ...], fds: Sequence[int] = ()) -> None:
    """Send one message, with ``fds`` attached to its first bytes."""
    data = marshal.dumps(message)
    frame = _HEADER.pack(len(data)) + data
    sent = sock.sendmsg(
        [frame], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    )
    if sent < len(frame):
        sock.sendall(frame[sent:])


def receive(sock: socket.socket) -> tuple[tuple[Any, ...], list[int]]:
    """One message and the descriptors that came with it (close-on-exec); raises Closed at end-of-file."""
    buffer = bytearray()
    fds: list[int] = []
    need = _HEADER.size
    size = -1
    while True:
        data, ancillary, _, _ = sock.recvmsg(
            max(need - len(buffer), 1), socket.CMSG_SPACE(_MAX_FDS * 4), socket.MSG_CMSG_CLOEXEC
        )
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not data:
            for fd in fds:
                os.close(fd)
            raise Closed
        buffer += data
        if size < 0 and len(buffer) >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buffer)
            if size > MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes is too large")
            need = _HEADER.size + size
        if size >= 0 and len(buffer) >= need:
            return marshal.loads(bytes(buffer[_HEADER.size :])), fds


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` (the thread that forked it) ends."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0)
    if os.getppid() != parent:  # the parent ended before the death signal was set
        os._exit(1)


def _prepare(join: Sequence[str], rlimits: Sequence[tuple[int, int]], parent: int) -> Any:
    """What the forked child does after its user switch and before exec: die with this spawner,
    enter its cgroups (``0`` = the writer), set rlimits."""

    def prepare() -> None:
        _die_with_parent(parent)
        for path in join:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        for kind, value in rlimits:
            resource.setrlimit(kind, (value, value))

    return prepare


class _Spawner:
    def __init__(self) -> None:
        self.children: dict[int, subprocess.Popen[bytes]] = {}  # unreaped, by pid
        self.me = os.getpid()

    def spawn(self, request: tuple[Any, ...], fds: list[int]) -> tuple[tuple[Any, ...], list[int]]:
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
        popen = self.children.get(pid)
        if popen is None:
            return ("unknown",)
        try:
            got, status, usage = os.wait4(pid, os.WNOHANG)
        except ChildProcessError:
            del self.children[pid]
            popen.returncode = -1
            return ("unknown",)
        if got == 0:
            return ("running",)
        del self.children[pid]
        popen.returncode = os.waitstatus_to_exitcode(status)
        return ("reaped", status, tuple(usage))


def main(fd: int) -> int:
    _die_with_parent(int(sys.argv[2]))
    sock = socket.socket(fileno=fd)
    spawner = _Spawner()
    send(sock, ("ready", os.getpid()))
    while True:
        try:
            request, fds = receive(sock)
        except (Closed, ConnectionError):
            return 0
        try:
            if request[0] == "spawn":
                reply, out = spawner.spawn(request, fds)
            elif request[0] == "reap":
                reply, out = spawner.reap(request[1]), []
            else:
                reply, out = ("failed", "protocol", 0, None, f"unknown request {request[0]!r}"), []
        finally:
            for received in fds:
                os.close(received)
        try:
            send(sock, reply, out)
        except (BrokenPipeError, ConnectionError):
            return 0
        finally:
            for sent in out:
                os.close(sent)


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
