"""A container's attached stdio: demultiplexed stdout/stderr delivered to the event loop as it arrives."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from docker.utils import socket as docker_socket

from expbuild_worker.model import LogStream

MAX_CHUNK = 64 * 1024
"""Largest LogChunk: big enough to batch small writes, small enough to stream smoothly."""

BUFFER_LIMIT = 4 * 1024 * 1024
"""Bytes read ahead of the consumer before the reader pauses (and the container's pipe fills)."""

_READ_SIZE = 1024 * 1024
"""Largest single read from the daemon: fewer wake-ups when output is fast; chunks are cut later."""

_HEADER = struct.Struct(">BxxxL")
_STREAMS = {1: LogStream.STDOUT, 2: LogStream.STDERR, 3: LogStream.STDERR}


class Demultiplexer:
    """Splits the daemon's multiplexed stream (8-byte header: stream id, size) into pieces.

    Feed it bytes in any split; it returns complete pieces in order, adjacent pieces of the
    same stream merged. Stream 3 (the daemon's own errors) is reported as stderr.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._stream: LogStream | None = None
        self._remaining = 0

    def feed(self, data: bytes) -> list[tuple[LogStream, bytes]]:
        self._buffer += data
        pieces: list[tuple[LogStream, bytes]] = []
        pos = 0
        buf = self._buffer
        while True:
            if self._remaining == 0:
                if len(buf) - pos < _HEADER.size:
                    break
                kind, size = _HEADER.unpack_from(buf, pos)
                pos += _HEADER.size
                self._stream = _STREAMS.get(kind)
                self._remaining = size
                continue
            take = min(self._remaining, len(buf) - pos)
            if take == 0:
                break
            piece = bytes(buf[pos : pos + take])
            pos += take
            self._remaining -= take
            if self._stream is not None:
                if pieces and pieces[-1][0] is self._stream:
                    pieces[-1] = (self._stream, pieces[-1][1] + piece)
                else:
                    pieces.append((self._stream, piece))
        del buf[:pos]
        return pieces

    @property
    def pending(self) -> bool:
        """True when the stream ended inside a frame (the daemon cut it short)."""
        return bool(self._buffer) or self._remaining > 0


def _raw_socket(sock: Any) -> Any:
    """The object to send on and shut down: the socket under a SocketIO, else the SDK's object."""
    return getattr(sock, "_sock", sock) if isinstance(sock, socket.SocketIO) else sock


class AttachedStreams:
    """Reads one container's attached socket on a background thread and hands batches to the loop.

    One thread per running container: docker-py's socket objects differ per transport (Unix,
    TCP, TLS, SSH), and a blocking read works on all of them. Reading pauses when more than
    ``BUFFER_LIMIT`` bytes wait for the consumer, so a slow client slows the command instead
    of growing the worker's memory, and while ``hold`` is in force (a log cap was reached):
    the daemon then stops copying the container's output (its log driver is ``none``, so it
    keeps no copy of its own) and the command's next write blocks.
    """

    def __init__(self, sock: Any, *, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._sock = sock
        self._raw = _raw_socket(sock)
        self._loop = loop
        self._name = name
        self._demux = Demultiplexer()
        self._pieces: deque[tuple[LogStream, bytes]] = deque()
        self._buffered = 0
        self._cond = threading.Condition()
        self._eof = False
        self._error: BaseException | None = None
        self._closed = False
        self._held = False
        self._woken = False
        self._wake = asyncio.Event()
        self._thread = threading.Thread(target=self._read_loop, name=f"expbuild-attach-{name}", daemon=True)

    def start(self) -> None:
        with contextlib.suppress(AttributeError, OSError):
            self._raw.settimeout(None)
        self._thread.start()

    # ---- reader thread ---------------------------------------------------------------------

    def _read_loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while (self._buffered > BUFFER_LIMIT or self._held) and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                data = docker_socket.read(self._sock, _READ_SIZE)
                if not data:
                    break
                pieces = self._demux.feed(data)
                if pieces:
                    with self._cond:
                        self._pieces.extend(pieces)
                        self._buffered += sum(len(p) for _, p in pieces)
                        wake, self._woken = not self._woken, True
                    if wake:  # one wake-up per consumer pass: the rest waits and batches up
                        self._notify(self._wake.set)
        except (OSError, ValueError) as err:  # ValueError: the socket was closed under us
            if not self._closed:
                self._error = err
        finally:
            with self._cond:
                self._eof = True
            self._notify(self._wake.set)

    def _notify(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self._loop.call_soon_threadsafe(callback)

    # ---- event loop side -------------------------------------------------------------------

    async def next_batch(self) -> list[tuple[LogStream, bytes]] | None:
        """Pieces in order (each at most ``MAX_CHUNK``, adjacent same-stream pieces merged), or
        None once the container closed its output and everything was delivered."""
        while True:
            self._wake.clear()
            with self._cond:
                self._woken = False
                if self._pieces:
                    batch = rechunk(self._pieces)
                    self._pieces.clear()
                    self._buffered = 0
                    self._cond.notify_all()
                    return batch
                if self._eof:
                    return None
            await self._wake.wait()

    def hold(self) -> None:
        """Stop reading the socket after the read in progress, until ``release``."""
        with self._cond:
            self._held = True

    def release(self) -> None:
        """Read again (as after the container exits, to reach the end of its output)."""
        with self._cond:
            self._held = False
            self._cond.notify_all()

    @property
    def error(self) -> BaseException | None:
        """Why reading stopped early (the connection broke), if it did."""
        return self._error

    @property
    def truncated(self) -> bool:
        return self._demux.pending

    def send_stdin(self, data: bytes) -> None:
        """Write ``data`` to the command's stdin and close it (blocking; run it on a thread)."""
        try:
            self._raw.sendall(data)
        finally:
            shutdown_write = getattr(self._raw, "shutdown_write", None)  # an SSH channel
            if shutdown_write is not None:
                shutdown_write()
            else:
                self._raw.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop reading and release the connection; idempotent, never blocks on the daemon."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        with contextlib.suppress(OSError, AttributeError):
            self._raw.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._raw is not self._sock:
            with contextlib.suppress(OSError, AttributeError):
                self._raw.close()
        response = getattr(self._sock, "_response", None)
        if response is not None:
            with contextlib.suppress(Exception):
                response.close()


def rechunk(pieces: deque[tuple[LogStream, bytes]]) -> list[tuple[LogStream, bytes]]:
    """Join each run of same-stream pieces, then cut it into ``MAX_CHUNK`` chunks (the last may be short)."""
    runs: list[tuple[LogStream, list[bytes]]] = []
    for stream, data in pieces:
        if runs and runs[-1][0] is stream:
            runs[-1][1].append(data)
        else:
            runs.append((stream, [data]))
    out: list[tuple[LogStream, bytes]] = []
    for stream, parts in runs:
        joined = parts[0] if len(parts) == 1 else b"".join(parts)
        out.extend((stream, joined[i : i + MAX_CHUNK]) for i in range(0, len(joined), MAX_CHUNK))
    return out
