"""The one mapping from the worker's error hierarchy to gRPC status codes."""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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


def unary(
    method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]:
    """Wrap a unary (or client-streaming) handler so WorkerErrors end the RPC with their status."""

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


def streaming(
    method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]],
) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncIterator[_Resp]]:
    """Wrap a server-streaming handler the same way."""

    @functools.wraps(method)
    async def wrapper(
        self: _Self, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Resp]:
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as err:
            await _abort(context, err)

    return wrapper
