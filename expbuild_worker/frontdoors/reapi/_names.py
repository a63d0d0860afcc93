"""Instance names and ByteStream resource names of the REAPI: parsed and checked in one place."""

from __future__ import annotations

from dataclasses import dataclass

from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.frontdoors._remote_actions import check_sha256
from expbuild_worker.model import Digest

_RESERVED = frozenset(
    ("blobs", "uploads", "actions", "actionResults", "operations", "capabilities", "compressed-blobs")
)
"""Path segments the REAPI forbids in instance names; the first one ends the instance name."""
_IDENTITY = "identity"
_DIGEST_FUNCTIONS = frozenset(
    ("sha256", "sha1", "md5", "vso", "sha384", "sha512", "murmur3", "sha256tree", "blake3")
)
"""Digest function segments newer clients put before the hash; none is served."""


def check_instance(name: str, served: str, field: str = "instance_name") -> None:
    """Refuse an instance name this server does not serve, naming it and the one it serves."""
    if name != served:
        raise InvalidRequestError(f"{field}: unknown instance {name!r}; this server serves {served!r}")


def check_instance_name(name: str) -> None:
    """Refuse, at construction, an instance name a client could not put in a resource name."""
    segments = name.split("/") if name else []
    bad = [s for s in segments if s in _RESERVED or not s]
    if bad:
        raise ValueError(
            f"instance name {name!r}: segments may not be empty or one of {', '.join(sorted(_RESERVED))}"
        )


@dataclass(frozen=True, slots=True)
class BlobResource:
    """A parsed ByteStream resource name: ``{instance}/[uploads/{id}/]blobs/{hash}/{size}``.

    ``compressed`` is true for the ``compressed-blobs/identity/…`` form, whose bytes are the
    blob's own; any other compressor is refused when the name is parsed.
    """

    instance: str
    digest: Digest
    upload_id: str | None
    compressed: bool


def parse_read_resource(name: str, served: str) -> BlobResource:
    """``{instance}/blobs/{hash}/{size}`` (or ``compressed-blobs/identity/…``), for ByteStream.Read."""
    return _parse(name, served, upload=False)


def parse_upload_resource(name: str, served: str) -> BlobResource:
    """``{instance}/uploads/{id}/blobs/{hash}/{size}[/metadata…]``, for Write and QueryWriteStatus."""
    return _parse(name, served, upload=True)


def _parse(name: str, served: str, *, upload: bool) -> BlobResource:
    form = "{instance}/uploads/{uuid}/blobs/{hash}/{size}" if upload else "{instance}/blobs/{hash}/{size}"
    segments = name.split("/")
    start = next((i for i, s in enumerate(segments) if s in _RESERVED), None)
    if start is None:
        raise InvalidRequestError(f"resource_name: {name!r} is not of the form {form}")
    check_instance("/".join(segments[:start]), served, "resource_name")
    rest = segments[start:]
    upload_id: str | None = None
    if upload:
        if rest[0] != "uploads" or len(rest) < 3 or not rest[1]:
            raise InvalidRequestError(f"resource_name: {name!r} is not of the form {form}")
        upload_id = rest[1]
        rest = rest[2:]
    compressed = rest[0] == "compressed-blobs"
    if compressed:
        compressor = rest[1] if len(rest) > 1 else ""
        if compressor != _IDENTITY:
            raise InvalidRequestError(
                f"resource_name: compressor {compressor!r} is not supported; this server serves "
                f"uncompressed blobs ({form}) and compressed-blobs/identity only"
            )
        rest = rest[1:]
    elif rest[0] != "blobs":
        raise InvalidRequestError(f"resource_name: {name!r} is not of the form {form}")
    # Upload names may carry metadata after the size; read names may not.
    if len(rest) < 3 or (not upload and len(rest) != 3):
        raise InvalidRequestError(f"resource_name: {name!r} is not of the form {form}")
    sha256, size_text = rest[1], rest[2]
    if sha256 in _DIGEST_FUNCTIONS:
        raise InvalidRequestError(
            f"resource_name: digest function {sha256!r} is not served; this server uses SHA-256 only "
            "(whose names carry no digest function segment)"
        )
    check_sha256(sha256, "resource_name")
    if not size_text.isdigit() or (len(size_text) > 1 and size_text[0] == "0"):
        raise InvalidRequestError(f"resource_name: size {size_text!r} is not a decimal number of bytes")
    return BlobResource(
        instance=served, digest=Digest(sha256, int(size_text)), upload_id=upload_id, compressed=compressed
    )
