"""The expbuild.worker.v1.WorkerService servicer: translate, delegate to the engine, translate back."""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from expbuild_worker import __version__
from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.server import _translate as tr
from expbuild_worker.server._status import maps_errors, send
from expbuild_worker.storage import BlobWriter
from expbuild_worker.storage._cas import check_digest
from expbuild_worker.validation import check_execution_id

Context = grpc.aio.ServicerContext[Any, Any]


def _platform() -> pb.Platform:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return pb.Platform(
        os=platform.system().lower(),
        arch=platform.machine(),
        cpu_count=len(os.sched_getaffinity(0)),
        memory_bytes=memory,
        kernel_release=platform.release(),
    )


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Holds no business logic; errors are mapped to statuses by ``maps_errors``."""

    def __init__(self, *, engine: ExecutionEngine, worker_id: str, limits: pb.WorkerLimits) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._limits = limits

    @maps_errors
    async def Execute(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: pb.ExecuteRequest, context: Context
    ) -> None:
        action = tr.action_from_pb(request)
        # aclosing: a vanished client cancels this task; the engine is closed (and the command
        # killed) right here, not whenever a suspended generator is garbage-collected.
        async with contextlib.aclosing(self._engine.execute(action)) as events:
            async for event in events:
                await send(context, tr.event_to_pb(event))

    @maps_errors
    async def CancelExecution(
        self, request: pb.CancelExecutionRequest, context: Context
    ) -> pb.CancelExecutionResponse:
        check_execution_id(request.execution_id)
        self._engine.cancel(request.execution_id)
        return pb.CancelExecutionResponse(was_active=True)

    @maps_errors
    async def GetCapabilities(
        self, request: pb.GetCapabilitiesRequest, context: Context
    ) -> pb.GetCapabilitiesResponse:
        caps = await self._engine.capabilities()
        return pb.GetCapabilitiesResponse(
            executors=[tr.capabilities_to_pb(c) for c in caps],
            platform=_platform(),
            max_concurrent_executions=self._engine.admission.max_running,
            max_queued_executions=self._engine.admission.max_queued,
            limits=self._limits,
            versions=pb.Versions(
                worker=__version__,
                api=pb.DESCRIPTOR.package,
                python=sys.version.split()[0],
                grpc=grpc.__version__,
            ),
            worker_id=self._worker_id,
        )

    @maps_errors
    async def Warmup(self, request: pb.WarmupRequest, context: Context) -> pb.WarmupResponse:
        reports = await self._engine.warmup(list(request.executors), list(request.images))
        return pb.WarmupResponse(executors=[tr.warmup_to_pb(r) for r in reports])

    @maps_errors
    async def UploadBlobs(
        self, request_iterator: AsyncIterator[pb.UploadBlobsRequest], context: Context
    ) -> pb.UploadBlobsResponse:
        store = self._engine.store
        stored: list[pb.Digest] = []
        writer: BlobWriter | None = None
        index = 0
        try:
            async for piece in request_iterator:
                digest = tr.digest_from_pb(piece.digest)
                if writer is not None and writer.digest != digest:
                    raise InvalidRequestError(
                        f"blob {writer.digest}: stream moved on to {digest} after {writer.received} of "
                        f"{writer.digest.size} bytes"
                    )
                if writer is None:
                    check_digest(digest, f"requests[{index}].digest")
                    if piece.offset != 0:
                        raise InvalidRequestError(
                            f"blob {digest}: first piece must start at offset 0, got {piece.offset}"
                        )
                    writer = store.writer(digest)
                elif piece.offset != writer.received:
                    raise InvalidRequestError(
                        f"blob {digest}: expected offset {writer.received}, got {piece.offset}"
                    )
                writer.write(piece.data)
                index += 1
                if writer.received == digest.size:
                    writer.commit()
                    writer = None
                    stored.append(piece.digest)
        finally:
            if writer is not None:
                writer.abort()
        if writer is not None:
            raise InvalidRequestError(
                f"blob {writer.digest}: stream ended after {writer.received} of {writer.digest.size} bytes"
            )
        return pb.UploadBlobsResponse(stored=stored)

    @maps_errors
    async def FindMissingBlobs(
        self, request: pb.FindMissingBlobsRequest, context: Context
    ) -> pb.FindMissingBlobsResponse:
        digests = [tr.digest_from_pb(d) for d in request.digests]
        for i, d in enumerate(digests):
            check_digest(d, f"digests[{i}]")
        missing = self._engine.store.find_missing(digests)
        return pb.FindMissingBlobsResponse(missing_digests=[tr.digest_to_pb(d) for d in missing])

    @maps_errors
    async def ReadBlob(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: pb.ReadBlobRequest, context: Context
    ) -> None:
        digest = tr.digest_from_pb(request.digest)
        check_digest(digest, "digest")
        offset = 0
        for chunk in self._engine.store.open_blob(digest):
            await send(context, pb.ReadBlobResponse(offset=offset, data=chunk))
            offset += len(chunk)
