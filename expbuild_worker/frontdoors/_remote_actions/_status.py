"""The worker's errors as google.rpc statuses with the details REAPI clients (and schedulers) act on."""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

from google.rpc import code_pb2, error_details_pb2, status_pb2

from expbuild_worker import errors
from expbuild_worker.frontdoors._remote_actions._digests import blob_subject
from expbuild_worker.model import Digest

_log = logging.getLogger(__name__)


class OutOfRangeError(errors.InvalidRequestError):
    """A read or write offset outside the blob: OUT_OF_RANGE, as ByteStream specifies.

    A front-door refinement of InvalidRequestError (the engine has no use for the distinction);
    anything that maps the base class still words it sensibly.
    """


_CODES: tuple[tuple[type[errors.WorkerError], int], ...] = (
    (OutOfRangeError, code_pb2.OUT_OF_RANGE),
    (errors.InvalidRequestError, code_pb2.INVALID_ARGUMENT),
    (errors.AlreadyExistsError, code_pb2.ALREADY_EXISTS),
    (errors.NotFoundError, code_pb2.NOT_FOUND),
    (errors.ResourceExhaustedError, code_pb2.RESOURCE_EXHAUSTED),
    (errors.PreconditionError, code_pb2.FAILED_PRECONDITION),
    (errors.UnavailableError, code_pb2.UNAVAILABLE),
    (errors.ConfigError, code_pb2.FAILED_PRECONDITION),
    (errors.InternalError, code_pb2.INTERNAL),
)

_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[0-9]+\])?(\.[A-Za-z_][A-Za-z0-9_]*(\[[0-9]+\])?)*$")
"""A field path such as ``requests[3].digest.hash``: what an InvalidRequestError's message starts with."""

TRAILER_DETAIL_BYTES = 2048
"""Most bytes of details put in a status that travels in trailing metadata. gRPC clients refuse
metadata over 8 KiB by default (the whole call then fails with a transport error), so a long list
of missing blobs is cut short there; the message still gives the total, and a status carried in
a message (ExecuteResponse.status) has no such limit."""


def error_to_status(err: BaseException, *, max_detail_bytes: int | None = None) -> status_pb2.Status:
    """The google.rpc.Status for ``err``, with the details REAPI clients act on.

    - MissingBlobsError → FAILED_PRECONDITION with a PreconditionFailure: one violation per
      missing digest, type ``MISSING``, subject ``blobs/{hash}/{size}`` (a client re-uploads those).
    - InvalidRequestError → INVALID_ARGUMENT with a BadRequest whose field violation names the
      field when the message starts with one (``field.path: problem``); OutOfRangeError → OUT_OF_RANGE.
    - Every other WorkerError → its code and message.
    - Anything else is a bug: INTERNAL with an error id, logged with the traceback under the same
      id; the client sees neither the exception's type nor its text.

    ``max_detail_bytes`` (None: no limit) bounds the details' serialized size: violations past it
    are left out.
    """
    if not isinstance(err, errors.WorkerError):
        error_id = uuid.uuid4().hex[:12]
        _log.error("unexpected error (error id %s)", error_id, exc_info=err)
        return status_pb2.Status(
            code=code_pb2.INTERNAL,
            message=f"internal error in the worker (error id {error_id}; details are in the worker's log)",
        )
    code = next((c for kind, c in _CODES if isinstance(err, kind)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=str(err))
    detail = _detail(err, max_detail_bytes)
    if detail is not None:
        status.details.add().Pack(detail)
    if code == code_pb2.INTERNAL:
        _log.error("internal error: %s", err, exc_info=err)
    return status


def _detail(err: errors.WorkerError, max_bytes: int | None) -> Any:
    if isinstance(err, errors.MissingBlobsError):
        failure = error_details_pb2.PreconditionFailure()
        size = 0
        for d in err.digests:
            if not isinstance(d, Digest):
                continue
            violation = error_details_pb2.PreconditionFailure.Violation(
                type="MISSING", subject=blob_subject(d)
            )
            size += violation.ByteSize() + 3  # tag and length
            if max_bytes is not None and size > max_bytes:
                break
            failure.violations.append(violation)
        return failure
    if isinstance(err, errors.InvalidRequestError):
        message = str(err)
        field, sep, _ = message.partition(":")
        if sep and _FIELD.match(field):
            named = error_details_pb2.BadRequest.FieldViolation(field=field, description=message)
            return error_details_pb2.BadRequest(field_violations=[named])
    return None
