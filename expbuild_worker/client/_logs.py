"""Reassembles stdout and stderr from LogChunks by offset."""

from __future__ import annotations

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.errors import UnavailableError

__all__ = ["LogReassembler"]


class LogReassembler:
    """Tracks each stream's next offset and returns exactly the bytes not seen yet.

    The worker sends each stream's chunks contiguous and in order, so :meth:`feed` normally
    returns ``chunk.data`` unchanged. A chunk overlapping bytes already seen is trimmed (a
    resent chunk never duplicates output); a gap means bytes were lost, which is an
    UnavailableError rather than silently shifted output.
    """

    def __init__(self) -> None:
        self._next: dict[int, int] = {pb.LOG_STREAM_STDOUT: 0, pb.LOG_STREAM_STDERR: 0}

    def feed(self, chunk: pb.LogChunk) -> bytes:
        if chunk.stream not in self._next:
            raise UnavailableError(f"log chunk names unknown stream {chunk.stream}")
        expected = self._next[chunk.stream]
        if chunk.offset > expected:
            name = pb.LogStream.Name(chunk.stream)
            raise UnavailableError(
                f"{name}: chunk at offset {chunk.offset} leaves a gap after byte {expected}"
            )
        new = chunk.data[expected - chunk.offset :]
        self._next[chunk.stream] = max(expected, chunk.offset + len(chunk.data))
        return new

    def received(self, stream: pb.LogStream) -> int:
        """Bytes of ``stream`` received so far."""
        return self._next[stream]
