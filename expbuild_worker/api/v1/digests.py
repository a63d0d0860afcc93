"""The own API's digests on the wire: the model's Digest as ``expbuild.worker.v1.Digest``, and back."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.model import Digest

__all__ = ["add_digests", "digest_from_pb", "digest_to_pb", "digests_from_pb", "fill_digest"]


def digest_from_pb(d: pb.Digest) -> Digest:
    """The model's digest, as sent; its form is checked where it is used (validation, the store)."""
    return Digest(d.sha256, d.size_bytes)


def digests_from_pb(digests: Iterable[pb.Digest]) -> list[Digest]:
    return [digest_from_pb(d) for d in digests]


def digest_to_pb(d: Digest) -> pb.Digest:
    return pb.Digest(sha256=d.sha256, size_bytes=d.size)


def fill_digest(out: pb.Digest, d: Digest) -> None:
    """Set a digest field of a message being built, in place (assigning a built one would copy it)."""
    out.sha256 = d.sha256
    out.size_bytes = d.size


def add_digests(out: RepeatedCompositeFieldContainer[pb.Digest], digests: Iterable[Digest]) -> None:
    """Append to a repeated field in place: a message built first and then added is copied."""
    add = out.add
    for d in digests:
        add(sha256=d.sha256, size_bytes=d.size)
