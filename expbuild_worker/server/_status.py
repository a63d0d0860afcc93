"""The one mapping from the worker's error hierarchy to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from expbuild_worker import errors

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
    code = status_code_for(err)
    if code is grpc.StatusCode.INTERNAL and not isinstance(err, errors.WorkerError):
        _log.exception("unexpected error in RPC")
        await context.abort(code, f"internal worker error: {type(err).__name__}: {err}")
    await context.abort(code, str(err))


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Self = TypeVar("_Self")


def maps_errors(
    method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]:
    """Wrap a handler coroutine so any error ends the RPC with its mapped status and message.

    Streaming handlers are coroutines that ``await context.write(...)`` rather than async
    generators: when a client vanishes, gRPC cancels the handler task, and the cancellation
    must land in our code (where ``finally`` and ``aclosing`` kill the action at once), not
    in a generator that gRPC stops iterating and the garbage collector finalises later.
    """

    @functools.wraps(method)
    async def wrapper(self: _Self, request: _Req, context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort(context, err)
            raise  # unreachable: abort raises

    return wrapper
