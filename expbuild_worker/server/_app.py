"""Hosting: one gRPC server for every front door the worker was built with, health, reflection, shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expbuild_worker.composition import Worker, build_worker, send_limit
from expbuild_worker.config import WorkerConfig
from expbuild_worker.errors import UnavailableError
from expbuild_worker.execution.host import GRPC_FORK_SUPPORT, grpc_fork_handlers_disabled
from expbuild_worker.server._health import HealthReporter

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
    _stopped: asyncio.Event

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
        await self._health.enter_graceful_shutdown()
        self.worker.engine.stop_accepting()
        await self.worker.shutdown(grace)
        await self._server.stop(grace=1.0)
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
    worker = await build_worker(config)
    server = grpc.aio.server(
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
    address = config.server.address
    host = f"[{address}]" if ":" in address else address
    try:
        port = server.add_insecure_port(f"{host}:{config.server.port}")
    except RuntimeError as err:
        await worker.shutdown(0)
        raise UnavailableError(f"cannot listen on {host}:{config.server.port}: {err}") from err
    await server.start()
    executing = [name for door in worker.front_doors for name in door.executing_service_names]
    reporter = HealthReporter(
        servicer=health_servicer,
        engine=worker.engine,
        executing=executing,
        storing=[name for name in services if name not in executing],
        interval_seconds=config.server.health_check_interval_seconds,
    )
    await reporter.start()
    _log.info("worker %s serving %s on %s:%d", worker.worker_id, ", ".join(services), host, port)
    return RunningServer(
        port=port,
        address=address,
        worker=worker,
        config=config,
        _server=server,
        _health=health_servicer,
        _reporter=reporter,
        _stopped=asyncio.Event(),
    )
