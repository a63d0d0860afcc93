"""The own API, ``expbuild.worker.v1.WorkerService``: a scheduler's way in, with live event streams."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass

import grpc

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.frontdoors import _grpc
from expbuild_worker.frontdoors.worker_v1 import _translate as tr
from expbuild_worker.frontdoors.worker_v1._servicer import WorkerServicer

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["WorkerService"].full_name


@dataclass(frozen=True, slots=True, kw_only=True)
class AdvertisedLimits:
    """The worker-wide limits GetCapabilities tells clients, in plain numbers."""

    max_request_bytes: int
    max_inline_input_bytes: int
    max_log_bytes_per_stream: int
    max_output_bytes: int
    default_timeout_seconds: float
    max_timeout_seconds: float

    def to_pb(self) -> pb.WorkerLimits:
        return pb.WorkerLimits(
            max_request_bytes=self.max_request_bytes,
            max_inline_input_bytes=self.max_inline_input_bytes,
            max_log_bytes_per_stream=self.max_log_bytes_per_stream,
            max_output_bytes=self.max_output_bytes,
            default_timeout=tr.duration_to_pb(self.default_timeout_seconds),
            max_timeout=tr.duration_to_pb(self.max_timeout_seconds),
        )


class WorkerApiFrontDoor:
    """Serves the own API over the engine. Its policies: a caller that goes away cancels its
    action, outputs and logs stream as chunks before the result, errors are plain statuses."""

    name = "worker_v1"
    service_names: tuple[str, ...] = (SERVICE_NAME,)
    executing_service_names: tuple[str, ...] = (SERVICE_NAME,)

    def __init__(
        self,
        *,
        engine: ExecutionEngine,
        worker_id: str,
        limits: AdvertisedLimits,
        pool: concurrent.futures.Executor,
        max_input_entries: int | None,
        max_digests_per_request: int,
    ) -> None:
        self._servicer = WorkerServicer(
            engine=engine,
            worker_id=worker_id,
            limits=limits.to_pb(),
            pool=pool,
            max_input_entries=max_input_entries,
            max_digests_per_request=max_digests_per_request,
        )

    def register(self, server: grpc.aio.Server) -> None:
        _grpc.register(server, pb_grpc.add_WorkerServiceServicer_to_server, self._servicer)

    async def close(self) -> None:
        """Nothing of its own to release: the engine and the pool belong to the worker."""


__all__ = ["SERVICE_NAME", "AdvertisedLimits", "WorkerApiFrontDoor"]
