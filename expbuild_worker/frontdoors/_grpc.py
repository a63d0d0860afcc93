"""What every front door does alike at the gRPC edge: registration, blocking calls, writes, error mapping."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeAlias, TypeVar, cast

import grpc
from google.protobuf.message import DecodeError

from expbuild_worker.errors import InvalidRequestError

_log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Decode = Callable[[bytes], Any]
DECODE_INLINE_BYTES = 1 << 20
"""Requests up to this size are decoded on the event loop; larger ones on a thread."""
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
_T = TypeVar("_T")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Self = TypeVar("_Self")


def register(server: grpc.aio.Server, add_to_server: Callable[[Any, Any], None], servicer: Any) -> None:
    """Register ``servicer`` with its generated ``add_…_to_server`` function, so that a request
    whose bytes are not a valid message is refused INVALID_ARGUMENT naming the method.

    gRPC would otherwise decode the request before our handler runs and answer a corrupt one
    with UNKNOWN and a library's internal text. Each handler here receives the raw bytes and
    decodes them itself; nothing else about the service changes.
    """
    capture = _Capture()
    add_to_server(servicer, capture)
    for service, handlers in capture.services:
        strict = {
            name: _decoding_in_handler(handler, f"{service}/{name}") for name, handler in handlers.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, strict),))
        server.add_registered_method_handlers(service, strict)


class _Capture:
    """Stands in for the server while a generated function registers its handlers."""

    def __init__(self) -> None:
        self.services: list[tuple[str, dict[str, Handler]]] = []

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """The same handlers arrive again through ``add_registered_method_handlers``."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.services.append((service, dict(handlers)))


_MAKERS: dict[tuple[bool, bool], Any] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def rewrap(handler: Handler, wrap: Callable[[Any], Any], *, decodes: bool = False) -> Handler:
    """A handler of ``handler``'s kind whose behaviour is ``wrap(its behaviour)``. With
    ``decodes``, the new behaviour receives the raw request bytes and decodes them itself."""
    # grpc types handlers for its synchronous server; ours are coroutines, hence Any.
    behaviour: Any = (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )
    make = _MAKERS[(handler.request_streaming, handler.response_streaming)]
    return cast(
        Handler,
        make(
            wrap(behaviour),
            request_deserializer=None if decodes else handler.request_deserializer,
            response_serializer=handler.response_serializer,
        ),
    )


def _decoding_in_handler(handler: Handler, method: str) -> Handler:
    decode: Decode | None = handler.request_deserializer
    if decode is None:
        return handler

    def streaming(behaviour: Any) -> Any:
        async def decoding(requests: AsyncIterator[bytes], context: Any) -> Any:
            return await behaviour(_decoded(requests, decode, method), context)

        return decoding

    def unary(behaviour: Any) -> Any:
        async def decoding(raw: bytes, context: Any) -> Any:
            try:
                # A large request is parsed on a thread: tens of MiB take the event loop (and every
                # other call, health included) for a noticeable time otherwise.
                request = (
                    await asyncio.to_thread(decode, raw) if len(raw) > DECODE_INLINE_BYTES else decode(raw)
                )
            except DecodeError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, _undecodable(method, err))
            return await behaviour(request, context)

        return decoding

    return rewrap(handler, streaming if handler.request_streaming else unary, decodes=True)


async def _decoded(requests: AsyncIterator[bytes], decode: Decode, method: str) -> AsyncIterator[Any]:
    """The stream's messages; a corrupt one is an InvalidRequestError the handler words."""
    index = 0
    async for raw in requests:
        try:
            yield decode(raw)
        except DecodeError as err:
            raise InvalidRequestError(f"requests[{index}]: {_undecodable(method, err)}") from None
        index += 1


def _undecodable(method: str, err: DecodeError) -> str:
    return f"the request is not a valid message for {method} ({err})"


MESSAGE_BYTES = 64 * 1024
"""Payload bytes per streamed response of file bytes (an output or blob chunk; the process
runner cuts log chunks to the same size). gRPC writes one large message far slower than the
same bytes in messages of this size: an output streamed through Execute went from ~395 to
480-575 MB/s when its 1 MiB reads were sent as 64 KiB responses."""


def message_pieces(data: bytes) -> Iterator[bytes]:
    """``data`` cut into MESSAGE_BYTES pieces, one per response (a short one last)."""
    view = memoryview(data)
    for start in range(0, len(view), MESSAGE_BYTES):
        yield bytes(view[start : start + MESSAGE_BYTES])


class CallGone(Exception):
    """A response could not be written: the client cancelled or disconnected (or, a bug, the
    message was over gRPC's send limit: gRPC then tells the client itself). Either way the call
    is over; gRPC raises the same error for both."""


async def send(context: Context, message: Any) -> None:
    """Write one response of a stream; a failed write means the call is over (see ``maps_errors``)."""
    try:
        await context.write(message)
    except grpc.aio.AbortError:
        raise
    except Exception as err:
        raise CallGone(str(err)) from err


Abort = Callable[[Context, Exception], Awaitable[None]]


class ErrorMapping:
    """A decorator for handler coroutines: any error ends the RPC through ``abort`` (each front
    door words errors its own way), and a stream whose client went away ends quietly.

    Streaming handlers are coroutines that ``await send(context, ...)`` rather than async
    generators: when a client vanishes, gRPC cancels the handler task, and the cancellation must
    land in our code (where ``finally`` and ``aclosing`` kill an action and release files at
    once), not in a generator that gRPC stops iterating and the garbage collector finalises later.
    """

    def __init__(self, abort: Abort) -> None:
        self._abort = abort

    def __call__(
        self, method: Callable[[_Self, _Req, Context], Awaitable[_Resp]]
    ) -> Callable[[_Self, _Req, Context], Awaitable[_Resp]]:
        abort = self._abort

        @functools.wraps(method)
        async def wrapper(self: _Self, request: _Req, context: Context) -> _Resp:
            try:
                return await method(self, request, context)
            except grpc.aio.AbortError:
                raise
            except CallGone as gone:  # nobody is left to tell; the handler cleaned up on the way out
                _log.info("%s: the call ended while a response was written: %s", method.__name__, gone)
                return None  # type: ignore[return-value]
            except Exception as err:
                await abort(context, err)
                raise  # unreachable: abort raises

        return wrapper


class BlockingCalls:
    """Runs one user's blocking calls (a handler's, an upload's) on ``pool``, one after another.

    A call starts only when the one before it has returned, even when the task that started
    that one was cancelled meanwhile (its thread cannot be stopped) and even when two tasks
    share this object (a resumed upload): two threads never use one writer at once. ``finish``
    runs a clean-up once the call in flight has returned. ``pool`` None is the event loop's
    default executor.
    """

    def __init__(self, pool: concurrent.futures.Executor | None) -> None:
        self._pool = pool
        self._last: asyncio.Future[Any] | None = None
        self._order = asyncio.Lock()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        async with self._order:
            await self.settle()
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            future.add_done_callback(_retrieve)
            self._last = future
        # Shielded: cancelling the caller must not mark the call done while its thread runs.
        return await asyncio.shield(future)

    async def settle(self) -> None:
        """Wait until the call in flight, if any, has returned (its outcome is its caller's)."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])

    def finish(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (on the event loop) now, or as soon as the call in flight returns."""
        last = self._last
        if last is None or last.done():
            cleanup()
        else:
            last.add_done_callback(lambda _: cleanup())


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome seen: a caller cancelled meanwhile never awaits it, and that is no error."""
    if not future.cancelled():
        future.exception()
