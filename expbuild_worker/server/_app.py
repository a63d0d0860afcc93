"""Hosting: one gRPC server for every front door the worker was built with, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expbuild_worker.composition import Worker, build_worker, send_limit
from expbuild_worker.config import WorkerConfig
from expbuild_worker.errors import UnavailableError
from expbuild_worker.execution.host import GRPC_FORK_SUPPORT, grpc_fork_handlers_disabled
from expbuild_worker.server._auth import (
    TokenCheck,
    check_listen_address,
    describe,
    is_loopback,
    read_tokens,
    server_credentials,
)
from expbuild_worker.server._health import HealthReporter
from expbuild_worker.server._metrics import MetricsEndpoint, RpcMetrics, check_metrics_address, serve_metrics

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class RunningServer:
    """A started worker. ``stop`` is the graceful shutdown; safe to call more than once."""

    port: int
    address: str
    worker: Worker
    config: WorkerConfig
    _server: grpc.aio.Server
    _health: health.aio.HealthServicer
    _reporter: HealthReporter
    _warning: asyncio.Task[None] | None
    _stopped: asyncio.Event
    metrics: MetricsEndpoint | None = None
    """The Prometheus endpoint when [metrics] is enabled (its port is real even when 0 was asked)."""

    @property
    def target(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        """Health goes NOT_SERVING, new actions get UNAVAILABLE, running ones get ``grace`` seconds
        (default: the configured shutdown grace) and are then cancelled; executors are closed last."""
        if self._stopped.is_set():
            return
        grace = self.config.server.shutdown_grace_seconds if grace is None else grace
        await self._reporter.stop()
        if self._warning is not None:
            self._warning.cancel()
        await self._health.enter_graceful_shutdown()
        self.worker.engine.stop_accepting()
        await self.worker.shutdown(grace)
        await self._server.stop(grace=1.0)
        if self.metrics is not None:  # last: the drain itself is observable
            await self.metrics.stop()
        self._stopped.set()


async def start_server(config: WorkerConfig) -> RunningServer:
    """Build the worker from ``config`` and serve it; port 0 binds a free port (see ``.port``).

    A process embedding the worker must call ``disable_grpc_fork_handlers`` before importing grpc
    (the ``expbuild-worker`` command does): host actions with limits are forked, and gRPC's fork
    handlers crash such children."""
    if not grpc_fork_handlers_disabled():
        _log.warning(
            "gRPC fork handlers are on (%s is not 0): host actions with limits may die with SIGSEGV; "
            "call expbuild_worker.execution.host.disable_grpc_fork_handlers() before importing grpc",
            GRPC_FORK_SUPPORT,
        )
    # Who may call is settled before anything is built: a refusal leaves nothing behind.
    check_listen_address(config.server, config.source)
    check_metrics_address(config)
    tokens = read_tokens(config.server, config.source)
    credentials = server_credentials(config.server, config.source) if config.server.tls else None
    address = config.server.address
    host = f"[{address}]" if ":" in address else address
    _check_port_free(address, config.server.port)
    worker = await build_worker(config)
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if worker.metrics is not None:  # first, so calls refused UNAUTHENTICATED are counted too
        interceptors.append(RpcMetrics(worker.metrics))
    if tokens:
        interceptors.append(TokenCheck(tokens))
    server = grpc.aio.server(
        interceptors=interceptors or None,
        options=[
            ("grpc.max_receive_message_length", config.server.max_request_bytes),
            ("grpc.max_send_message_length", send_limit(config)),
            ("grpc.so_reuseport", 0),
        ],
    )
    services: list[str] = []
    for door in worker.front_doors:
        door.register(server)
        services.extend(door.service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
        server,
    )
    try:
        if credentials is not None:
            port = server.add_secure_port(f"{host}:{config.server.port}", credentials)
        else:
            port = server.add_insecure_port(f"{host}:{config.server.port}")
    except RuntimeError as err:
        await worker.shutdown(0)
        raise UnavailableError(f"cannot listen on {host}:{config.server.port}: {err}") from err
    await server.start()
    metrics = None
    if worker.metrics is not None:
        try:
            metrics = serve_metrics(config, worker.metrics)
        except BaseException:
            await server.stop(None)
            await worker.shutdown(0)
            raise
    executing = [name for door in worker.front_doors for name in door.executing_service_names]
    reporter = HealthReporter(
        servicer=health_servicer,
        engine=worker.engine,
        executing=executing,
        storing=[name for name in services if name not in executing],
        interval_seconds=config.server.health_check_interval_seconds,
    )
    await reporter.start()
    _log.info(
        "worker %s serving %s on %s:%d (%s)",
        worker.worker_id,
        ", ".join(services),
        host,
        port,
        ", ".join(describe(config.server)),
    )
    warning = None
    if not is_loopback(address) and not (config.server.tls or tokens):
        warning = asyncio.get_running_loop().create_task(_warn_insecure(f"{host}:{port}"))
    return RunningServer(
        port=port,
        address=address,
        worker=worker,
        config=config,
        _server=server,
        _health=health_servicer,
        _reporter=reporter,
        _warning=warning,
        _stopped=asyncio.Event(),
        metrics=metrics,
    )


INSECURE_WARNING_SECONDS = 3600.0


async def _warn_insecure(where: str) -> None:
    """allow_insecure_remote: said at start and every hour, so it is never forgotten."""
    while True:
        _log.warning(
            "listening on %s without TLS or tokens (server.allow_insecure_remote): anyone who reaches "
            "this address can run commands here",
            where,
        )
        await asyncio.sleep(INSECURE_WARNING_SECONDS)


def _check_port_free(address: str, port: int) -> None:
    """Say plainly when the address is taken, instead of gRPC's internal text."""
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise UnavailableError(
                    f"address {address}:{port} is already in use; pick another with --port or [server] port"
                ) from err
            raise UnavailableError(f"cannot listen on {address}:{port}: {err.strerror}") from err
