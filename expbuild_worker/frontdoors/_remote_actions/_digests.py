"""REAPI digests on the wire ↔ the worker's ``Digest``, with the checks, in one place."""

from __future__ import annotations

from collections.abc import Iterable

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import Digest

_HEX = frozenset("0123456789abcdef")
_SHA256_NAMES = (re_pb.DigestFunction.UNKNOWN, re_pb.DigestFunction.SHA256)
"""Values of a request's ``digest_function`` we accept: unset means "inferred", and that is SHA-256."""


def check_sha256(value: str, field: str) -> None:
    """Raise InvalidRequestError naming ``field`` unless ``value`` is 64 lower-case hex characters."""
    if len(value) != 64 or not _HEX.issuperset(value):
        shown = value if len(value) <= 80 else value[:80] + "…"
        raise InvalidRequestError(
            f"{field}: expected a SHA-256 hash (64 lower-case hex characters), got {shown!r}"
        )


def check_size(size: int, field: str) -> None:
    if size < 0:
        raise InvalidRequestError(f"{field}: expected zero or more bytes, got {size}")


def digest_from_pb(digest: re_pb.Digest, field: str) -> Digest:
    """The checked ``Digest`` of a wire digest; InvalidRequestError names ``field``.hash or .size_bytes."""
    check_sha256(digest.hash, f"{field}.hash")
    check_size(digest.size_bytes, f"{field}.size_bytes")
    return Digest(digest.hash, digest.size_bytes)


def digests_from_pb(digests: Iterable[re_pb.Digest], field: str) -> list[Digest]:
    """Each checked, named ``field[i]`` when it is wrong."""
    return [digest_from_pb(d, f"{field}[{i}]") for i, d in enumerate(digests)]


def digest_to_pb(digest: Digest) -> re_pb.Digest:
    return re_pb.Digest(hash=digest.sha256, size_bytes=digest.size)


def blob_subject(digest: Digest) -> str:
    """How a google.rpc.PreconditionFailure names a missing blob, as the REAPI specifies."""
    return f"blobs/{digest.sha256}/{digest.size}"


def check_digest_function(value: int, field: str = "digest_function") -> None:
    """Refuse any digest function but SHA-256 (unset counts as SHA-256: the only one served)."""
    if value not in _SHA256_NAMES:
        name = (
            re_pb.DigestFunction.Value.Name(value) if value in re_pb.DigestFunction.Value.values() else value
        )
        raise InvalidRequestError(f"{field}: {name} is not served; this server uses SHA256 only")
