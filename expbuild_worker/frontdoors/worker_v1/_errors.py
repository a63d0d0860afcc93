"""The own API's wording of the worker's errors: one mapping to gRPC status codes."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import grpc

from expbuild_worker import errors
from expbuild_worker.frontdoors import _grpc

_log = logging.getLogger(__name__)

_CODES: tuple[tuple[type[errors.WorkerError], grpc.StatusCode], ...] = (
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.ResourceExhaustedError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.UnavailableError, grpc.StatusCode.UNAVAILABLE),
    (errors.ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.InternalError, grpc.StatusCode.INTERNAL),
)


def status_code_for(err: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(err, kind):
            return code
    return grpc.StatusCode.INTERNAL


async def _abort(context: grpc.aio.ServicerContext[Any, Any], err: Exception) -> None:
    """End the call with ``err``'s status. A fault that is not one of ours is logged with an
    error id and reaches the client as that id only: never a type name or an internal message."""
    code = status_code_for(err)
    if not isinstance(err, errors.WorkerError):
        error_id = uuid.uuid4().hex[:12]
        _log.exception("unexpected error in RPC (error id %s)", error_id)
        await context.abort(
            code, f"internal worker error (error id {error_id}; the worker's log has the cause)"
        )
    await context.abort(code, str(err))


maps_errors = _grpc.ErrorMapping(_abort)
"""Handler decorator: any error ends the RPC with its status and message (``_abort``)."""
send = _grpc.send
