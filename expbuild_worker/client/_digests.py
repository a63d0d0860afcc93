"""Digests on the wire: the engine's Digest as the API's message."""

from __future__ import annotations

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.model import Digest

__all__ = ["to_proto"]


def to_proto(digest: Digest) -> pb.Digest:
    return pb.Digest(sha256=digest.sha256, size_bytes=digest.size)
