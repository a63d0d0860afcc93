"""Prometheus at the edge: per-RPC counts and latencies, and the HTTP endpoint of a worker's metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from expbuild_worker.config import WorkerConfig
from expbuild_worker.errors import ConfigError, UnavailableError
from expbuild_worker.frontdoors._grpc import Handler, rewrap
from expbuild_worker.server._auth import is_loopback

_log = logging.getLogger(__name__)

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0, 300.0, 3600.0)
"""Seconds: from a sub-millisecond unary call to an Execute stream as long as its action."""


class RpcMetrics(grpc.aio.ServerInterceptor):
    """Counts every call by method and final status code, and times it (a stream until its last
    message). First among the server's interceptors, so calls refused UNAUTHENTICATED count too.
    Calls to methods the server does not have are left to gRPC (UNIMPLEMENTED) and not counted:
    a caller could otherwise grow the label set without bound."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._calls = Counter(
            "expbuild_worker_rpcs",
            "gRPC calls handled, by method (service/method) and status code.",
            ["method", "code"],
            registry=registry,
        )
        self._seconds = Histogram(
            "expbuild_worker_rpc_duration_seconds",
            "Seconds from a call's start to its end, by method (a stream lasts until its last message).",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        return rewrap(handler, self._measured(details.method.lstrip("/")))

    def _measured(self, method: str) -> Callable[[Any], Any]:
        def wrap(behaviour: Any) -> Any:
            if inspect.isasyncgenfunction(behaviour):

                async def measured_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                    started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
                    try:
                        async for response in behaviour(request, context):
                            yield response
                        code = _code(context)
                    except BaseException as err:
                        code = _failed(err, context)
                        raise
                    finally:
                        self._record(method, code, started)

                return measured_stream

            async def measured(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                started, code = time.perf_counter(), grpc.StatusCode.UNKNOWN
                try:
                    response = await behaviour(request, context)
                    code = _code(context)
                    return response
                except BaseException as err:
                    code = _failed(err, context)
                    raise
                finally:
                    self._record(method, code, started)

            return measured

        return wrap

    def _record(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self._calls.labels(method, code.name).inc()
        self._seconds.labels(method).observe(time.perf_counter() - started)


def _code(context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The code a handler that returned normally ended with: OK unless it set another."""
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.OK


def _failed(err: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """``context.abort`` raises after setting the code; a cancelled call raises CancelledError;
    anything else reaches the client as UNKNOWN."""
    if isinstance(err, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    code = context.code()
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def check_metrics_address(config: WorkerConfig) -> None:
    """Metrics say what runs here and for whom: beyond loopback they are served only over TLS
    (the server's certificate) or when ``server.allow_insecure_remote`` says the network is
    trusted. Bearer tokens do not protect them: Prometheus scrapes over plain HTTP(S)."""
    metrics, server = config.metrics, config.server
    if not metrics.enabled or is_loopback(metrics.address) or server.tls or server.allow_insecure_remote:
        return
    raise ConfigError(
        f"{config.source}: metrics.address: {metrics.address!r} is reachable from other machines; "
        "configure server.tls_certificate_file and server.tls_private_key_file (the metrics are then "
        "served over HTTPS with that certificate, to clients the server.tls_client_ca_file signed when "
        "it is set), or set server.allow_insecure_remote = true on a network you trust, or keep "
        "metrics.address on loopback"
    )


@dataclass(eq=False)
class MetricsEndpoint:
    """The HTTP server of one worker's metrics registry, on a thread of its own; ``stop`` ends it."""

    address: str
    port: int
    tls: bool
    _httpd: WSGIServer
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/metrics"

    async def stop(self) -> None:
        """Stop serving and release the port; waits (off the event loop) for the thread to end."""
        await asyncio.to_thread(self._httpd.shutdown)
        self._httpd.server_close()
        await asyncio.to_thread(self._thread.join, 10)


def serve_metrics(config: WorkerConfig, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve ``registry`` at ``[metrics] address:port`` (port 0 = a free one, see ``.port``);
    over HTTPS with the server's certificate when the address is not loopback and the server
    has TLS. The certificate is read once, at start."""
    metrics, server = config.metrics, config.server
    tls = server.tls and not is_loopback(metrics.address)
    try:
        httpd, thread = start_http_server(
            metrics.port,
            addr=metrics.address,
            registry=registry,
            certfile=server.tls_certificate_file if tls else None,
            keyfile=server.tls_private_key_file if tls else None,
            client_cafile=(server.tls_client_ca_file or None) if tls else None,
            client_auth_required=tls and bool(server.tls_client_ca_file),
        )
    except OSError as err:
        raise UnavailableError(
            f"cannot serve metrics on {metrics.address}:{metrics.port} ([metrics] address, port): "
            f"{err.strerror or err}"
        ) from err
    endpoint = MetricsEndpoint(
        address=metrics.address, port=httpd.server_port, tls=tls, _httpd=httpd, _thread=thread
    )
    _log.info("metrics at %s", endpoint.url)
    return endpoint
