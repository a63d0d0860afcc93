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


class _CallGone(Exception):
    """A response could not be written: the client cancelled or disconnected (or, a bug, the
    message was over gRPC's send limit: gRPC then tells the client itself). Either way the call
    is over; gRPC raises the same error for both."""


async def send(context: grpc.aio.ServicerContext[Any, Any], message: Any) -> None:
    """Write one response of a stream; a failed write means the call is over (see maps_errors)."""
    try:
        await context.write(message)
    except grpc.aio.AbortError:
        raise
    except Exception as err:
        raise _CallGone(str(err)) from err


_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Self = TypeVar("_Self")


def maps_errors(
    method: Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_Self, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]:
    """Wrap a handler coroutine so any error ends the RPC with its mapped status and message.

    A stream whose client went away (a failed ``send``) ends quietly. Streaming handlers are
    coroutines that ``await send(context, ...)`` rather than async generators: when a client
    vanishes, gRPC cancels the handler task, and the cancellation must land in our code (where
    ``finally`` and ``aclosing`` kill the action at once), not in a generator that gRPC stops
    iterating and the garbage collector finalises later.
    """

    @functools.wraps(method)
    async def wrapper(self: _Self, request: _Req, context: grpc.aio.ServicerContext[Any, Any]) -> _Resp:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except _CallGone as gone:  # nobody is left to tell; the handler has cleaned up on the way out
            _log.warning("%s: the call ended while a response was written: %s", method.__name__, gone)
            return None  # type: ignore[return-value]
        except Exception as err:
            await _abort(context, err)
            raise  # unreachable: abort raises

    return wrapper
