"""Truthful health: the standard health service says SERVING only for what can run an action now."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence

from grpc_health.v1 import health, health_pb2

from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.model import Readiness

_log = logging.getLogger(__name__)

EXECUTOR_SERVICE_PREFIX = "expbuild.worker.v1.WorkerService/"
"""Each executor has a health service of its own: ``expbuild.worker.v1.WorkerService/<name>``."""

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class HealthReporter:
    """Keeps the health service's answers true, checking every executor's readiness every
    ``interval_seconds``.

    - ``""`` (the whole worker) and ``executing`` services (those that run actions: the own API,
      REAPI Execution) are SERVING only while the default executor is ready: a worker whose
      Docker engine is down, or whose image is missing under pull policy ``never``, says so.
    - ``storing`` services (CAS, ByteStream, action cache, capabilities) answer from the store and
      are SERVING whatever the executors do.
    - ``expbuild.worker.v1.WorkerService/<executor>`` reports each executor.
    A change is logged once, with the executor's reason, when it happens.
    """

    def __init__(
        self,
        *,
        servicer: health.aio.HealthServicer,
        engine: ExecutionEngine,
        executing: Sequence[str],
        storing: Sequence[str],
        interval_seconds: float,
    ) -> None:
        self._servicer = servicer
        self._engine = engine
        self._executing = tuple(executing)
        self._storing = tuple(storing)
        self._interval = interval_seconds
        self._last: dict[str, Readiness] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Set every answer now, then keep them current in the background."""
        for service in self._storing:
            await self._servicer.set(service, _SERVING)
        await self.refresh()
        self._task = asyncio.get_running_loop().create_task(self._keep_current())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        readiness = await self._engine.readiness()
        self._log_changes(readiness)
        for name, ready in readiness.items():
            await self._servicer.set(
                EXECUTOR_SERVICE_PREFIX + name, _SERVING if ready.ready else _NOT_SERVING
            )
        overall = _state(readiness[self._engine.default_executor])
        for service in ("", *self._executing):
            await self._servicer.set(service, overall)

    async def _keep_current(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:
                _log.exception("checking the executors' readiness failed")

    def _log_changes(self, readiness: Mapping[str, Readiness]) -> None:
        for name, ready in readiness.items():
            before = self._last.get(name)
            if before is not None and before.ready == ready.ready:
                continue
            if ready.ready:
                if before is not None:
                    _log.info("executor %s is ready again", name)
            else:
                _log.warning("executor %s cannot run actions: %s", name, ready.message)
        self._last = dict(readiness)


def _state(readiness: Readiness) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    return _SERVING if readiness.ready else _NOT_SERVING
