"""SHA-256 digests of local files, computed while streaming from disk."""

from __future__ import annotations

import hashlib
from pathlib import Path

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.model import Digest

__all__ = ["digest_bytes", "digest_file", "to_proto"]


def digest_file(path: Path) -> Digest:
    """Digest of the file's content, read in chunks so large files never sit whole in memory."""
    with open(path, "rb") as fh:
        sha = hashlib.file_digest(fh, "sha256")
        size = fh.tell()
    return Digest(sha.hexdigest(), size)


def digest_bytes(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def to_proto(digest: Digest) -> pb.Digest:
    return pb.Digest(sha256=digest.sha256, size_bytes=digest.size)
