"""The worker's side of the in-container agent (``execution/agent/``) and the command's pipes.

A pool container whose PID 1 is the agent is entered without the engine: the worker passes the
command's argv, environment, directory and three pipe ends over one Unix socket, and reads the
command's output from its own ends of those pipes. The protocol is described in the C file.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import struct
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TypeVar

from expbuild_worker.execution.docker._attach import BUFFER_LIMIT, rechunk
from expbuild_worker.model import LogStream

T = TypeVar("T")

AGENT_MOUNT = "/.expbuild"
"""Where a pool container sees the agent's directory (read-only): the binary and the socket."""

SOCKET_NAME = "agent.sock"

PROTOCOL_VERSION = 1

_HEADER = struct.Struct("=Iiii")
_CREDENTIALS = struct.Struct("=iII")
_READY, _RUN, _SIGNAL, _PID, _STARTED, _FAILED, _EXITED, _CHECK, _CHECKED = range(1, 10)
_CHANGES = {
    1: "resource limits",
    2: "nice value",
    3: "I/O priority",
    4: "scheduling policy",
    5: "CPU affinity",
    6: "OOM score",
}
_STAGES = {1: "the request", 2: "fork", 3: "its working directory", 4: "exec", 5: "its stdio"}
_BODY_PIECE = 64 * 1024
_CHECK_SECONDS = 5.0
_READ_SIZE = 256 * 1024


class AgentLost(Exception):
    """The connection to a container's agent broke: the container is gone or unusable."""


class CommandNotStarted(Exception):
    """The agent could not start the command; the message says at which step and why."""


class AgentListener:
    """The socket a new pool container's agent connects to, bound before the container starts.

    Only the container's PID 1 may use it: ``accept`` checks the peer's pid, then unlinks the
    socket, so no later process in the container can connect."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Through the directory's descriptor: a socket path may have at most 107 bytes, and
            # the pool's directory is named after the worker and the executor.
            self._sock.bind(f"/proc/self/fd/{self._dir_fd}/{SOCKET_NAME}")
            os.chmod(SOCKET_NAME, 0o666, dir_fd=self._dir_fd)  # the container's user connects to it
            self._sock.listen(1)
            self._sock.setblocking(False)
        except BaseException:
            self.close()
            raise

    async def accept(self, *, init_pid: int, within: float) -> AgentLink:
        """The link to the agent that is ``init_pid`` (a host pid), once it said it is ready."""
        loop = asyncio.get_running_loop()
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(self._sock), within)
        except TimeoutError:
            raise AgentLost(f"the agent did not connect within {within:g} s") from None
        finally:
            self.close()
        pid, _uid, _gid = _CREDENTIALS.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDENTIALS.size)
        )
        if pid != init_pid:
            conn.close()
            raise AgentLost(f"process {pid}, not the container's init {init_pid}, connected")
        link = AgentLink(conn, loop)
        try:
            version = await asyncio.wait_for(link.ready, within)
        except BaseException:
            link.close()
            raise
        if version != PROTOCOL_VERSION:
            link.close()
            raise AgentLost(f"the agent speaks protocol {version}, the worker {PROTOCOL_VERSION}")
        return link

    def close(self) -> None:
        self._sock.close()
        if self._dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(SOCKET_NAME, dir_fd=self._dir_fd)
            os.close(self._dir_fd)
            self._dir_fd = -1


class AgentLink:
    """One agent's connection, on the event loop: one command at a time."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self._sock = sock
        self._loop = loop
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.ready: asyncio.Future[int] = loop.create_future()
        self._started: asyncio.Future[int] | None = None
        self._exited: asyncio.Future[int] | None = None
        self._checked: asyncio.Future[str] | None = None
        self._pid = 0
        self._searched = False
        self._closed = False
        loop.add_reader(sock.fileno(), self._on_readable)

    @property
    def alive(self) -> bool:
        return not self._closed

    async def run(
        self,
        argv: Sequence[str],
        environment: Mapping[str, str],
        cwd: str,
        stdio: tuple[int, int, int],
    ) -> tuple[int, asyncio.Future[int]]:
        """Start a command with ``stdio`` (stdin, stdout, stderr) as its descriptors 0-2.

        Returns its host pid (0 if it was not learnt) and a future of its wait status (as
        ``waitpid`` gives it; AgentLost when the agent goes first). Raises CommandNotStarted
        when argv[0] or ``cwd`` cannot be used, AgentLost when the agent is gone."""
        if self._closed:
            raise AgentLost("the agent's connection is closed")
        if self._started is not None or self._exited is not None:
            raise RuntimeError("the agent runs one command at a time")
        strings = [cwd, *argv, *(f"{key}={value}" for key, value in environment.items())]
        body = b"".join(os.fsencode(text) + b"\0" for text in strings)
        self._pid = 0
        self._searched = "/" not in argv[0]
        self._started = self._loop.create_future()
        self._exited = self._loop.create_future()
        header = _HEADER.pack(_RUN, len(body), len(argv), len(environment))
        try:
            self._sock.sendmsg([header], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", *stdio))])
            for start in range(0, len(body), _BODY_PIECE):
                await self._loop.sock_sendall(self._sock, body[start : start + _BODY_PIECE])
        except OSError as err:
            self._lost(AgentLost(f"could not send the command to the agent: {err}"))
        exited = self._exited
        try:
            return await self._started, exited
        except CommandNotStarted:
            self._started = self._exited = None
            raise

    async def check(self) -> str:
        """Between actions: what of the agent that later commands would inherit (limits, nice,
        I/O priority, scheduling, CPU affinity, OOM score) a command changed; empty when nothing."""
        if self._closed:
            return "the agent's connection is closed"
        if self._exited is not None:
            return "a command is still running"
        self._checked = self._loop.create_future()
        try:
            self._sock.send(_HEADER.pack(_CHECK, 0, 0, 0))
            return await asyncio.wait_for(asyncio.shield(self._checked), _CHECK_SECONDS)
        except (OSError, TimeoutError, AgentLost) as err:
            return f"the agent did not answer a check: {err!r}"
        finally:
            self._checked = None

    def signal(self, signum: int) -> None:
        """Ask the agent to signal the running command (when its host pid is not known)."""
        with contextlib.suppress(OSError):
            self._sock.send(_HEADER.pack(_SIGNAL, signum, 0, 0))

    def close(self) -> None:
        """Drop the connection: the agent exits, and the container with it."""
        if not self._closed:
            self._lost(AgentLost("the agent's connection was closed"))

    # ---- messages --------------------------------------------------------------------------

    def _on_readable(self) -> None:
        while not self._closed:
            try:
                data, ancillary, _flags, _addr = self._sock.recvmsg(
                    _HEADER.size, socket.CMSG_SPACE(_CREDENTIALS.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self._lost(AgentLost(f"the agent's connection broke: {err}"))
                return
            if not data:
                self._lost(AgentLost("the agent exited (its container stopped or was killed)"))
                return
            if len(data) != _HEADER.size:
                self._lost(AgentLost(f"the agent sent a message of {len(data)} bytes"))
                return
            kind, a, b, _c = _HEADER.unpack(data)
            if kind == _PID:
                self._pid = _sender_pid(ancillary)
            elif kind == _READY:
                _settle(self.ready, a)
            elif kind == _STARTED and self._started is not None:
                _settle(self._started, self._pid)
            elif kind == _FAILED and self._started is not None:
                stage = _STAGES.get(b, f"step {b}")
                reason = os.strerror(a) if a else "unknown error"
                if b == 4 and a == errno.ENOENT and self._searched:
                    reason += " (not found in the command's PATH)"
                if not self._started.done():
                    self._started.set_exception(CommandNotStarted(f"{stage}: {reason}"))
                if b == 1:  # the agent gives up on a request it cannot read
                    self._lost(AgentLost(f"the agent refused the request: {reason}"))
            elif kind == _EXITED and self._exited is not None:
                _settle(self._exited, a)
                self._started = self._exited = None  # the next command may come
            elif kind == _CHECKED and self._checked is not None:
                what = "a command is still running" if a == 2 else _CHANGES.get(b, f"item {b}") if a else ""
                _settle(self._checked, f"a command changed the agent's {what}" if a == 1 else what)
            else:
                self._lost(AgentLost(f"the agent sent an unexpected message (kind {kind})"))

    def _lost(self, error: AgentLost) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for future in (self.ready, self._started, self._exited, self._checked):
            if future is not None and not future.done():
                future.set_exception(error)
                future.exception()  # retrieved: a command that never waits on it is no error


def _settle(future: asyncio.Future[T], value: T) -> None:
    if not future.done():
        future.set_result(value)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            return int(_CREDENTIALS.unpack_from(data)[0])
    return 0


def exit_code(wait_status: int) -> int:
    """A wait status as the engine words an exit: the code, or 128 + the signal that killed it."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


class PipeStreams:
    """A command's stdout and stderr pipes read on the event loop, behind AttachedStreams' interface.

    Reading pauses while more than ``BUFFER_LIMIT`` bytes wait for the consumer or while
    ``hold`` is in force: the pipe then fills and the command's next write blocks."""

    def __init__(
        self, *, stdout: int, stderr: int, stdin: int | None, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._loop = loop
        self._open = {stdout: LogStream.STDOUT, stderr: LogStream.STDERR}
        self._stdin = stdin
        self._stdin_lock = threading.Lock()  # written on a thread, closed on the loop
        self._pieces: deque[tuple[LogStream, bytes]] = deque()
        self._buffered = 0
        self._held = False
        self._reading = False
        self._closed = False
        self._wake = asyncio.Event()

    def start(self) -> None:
        for fd in self._open:
            os.set_blocking(fd, False)
        self._resume()

    def _resume(self) -> None:
        if self._reading or self._held or self._closed or self._buffered > BUFFER_LIMIT:
            return
        self._reading = True
        for fd in self._open:
            self._loop.add_reader(fd, self._on_readable, fd)

    def _pause(self) -> None:
        if self._reading:
            self._reading = False
            for fd in self._open:
                self._loop.remove_reader(fd)

    def _on_readable(self, fd: int) -> None:
        try:
            data = os.read(fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if data:
            self._pieces.append((self._open[fd], data))
            self._buffered += len(data)
            if self._buffered > BUFFER_LIMIT:
                self._pause()
        else:
            self._loop.remove_reader(fd)
            del self._open[fd]
            os.close(fd)
        self._wake.set()

    async def next_batch(self) -> list[tuple[LogStream, bytes]] | None:
        """Pieces in order of reading, or None once both pipes reached end-of-file and all was delivered."""
        while True:
            self._wake.clear()
            if self._pieces:
                batch = rechunk(self._pieces)
                self._pieces.clear()
                self._buffered = 0
                self._resume()
                return batch
            if not self._open:
                return None
            await self._wake.wait()

    def hold(self) -> None:
        self._held = True
        self._pause()

    def release(self) -> None:
        self._held = False
        self._resume()

    @property
    def error(self) -> BaseException | None:
        return None

    @property
    def truncated(self) -> bool:
        return False

    def send_stdin(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin and close it (blocking; run it on a thread)."""
        with self._stdin_lock:
            fd, self._stdin = self._stdin, None
        if fd is None:
            return
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)

    def close(self) -> None:
        """Stop reading and close the worker's ends; idempotent."""
        if self._closed:
            return
        self._pause()
        self._closed = True
        for fd in self._open:
            os.close(fd)
        self._open.clear()
        with self._stdin_lock:
            stdin, self._stdin = self._stdin, None
        if stdin is not None:
            os.close(stdin)
