"""The expbuild.worker.v1.WorkerService servicer: translate, delegate to the engine, translate back."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import platform
import sys
import time
from collections.abc import AsyncIterator, Generator, Iterator
from typing import Any, TypeVar

import grpc

from expbuild_worker import __version__
from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.api.v1.digests import add_digests, digest_from_pb, digests_from_pb
from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.frontdoors._grpc import BlockingCalls, CallGone, message_pieces
from expbuild_worker.frontdoors.worker_v1 import _translate as tr
from expbuild_worker.frontdoors.worker_v1._errors import maps_errors, send
from expbuild_worker.model import Accepted, ActionResult, Digest, OutputChunk, StageEntered
from expbuild_worker.storage import BlobStore, BlobWriter
from expbuild_worker.storage._cas import check_digest
from expbuild_worker.validation import check_digest_count, check_execution_id, check_input_entries

Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")

INLINE_INPUT_ENTRIES = 256
"""An Execute with at most this many input entries is translated on the event loop: for a
small action a thread hop costs more than the work, and the host path's per-action overhead
is a benchmarked target. Larger ones are translated on the servicer's pool."""


def _platform() -> pb.Platform:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return pb.Platform(
        os=platform.system().lower(),
        arch=platform.machine(),
        cpu_count=len(os.sched_getaffinity(0)),
        memory_bytes=memory,
        kernel_release=platform.release(),
    )


class _Upload:
    """The state of one UploadBlobs stream: each piece is checked and written by ``take``,
    on a pool thread (opening, writing, hashing and publishing are disk and CPU work)."""

    def __init__(self, store: BlobStore) -> None:
        self._store = store
        self._writer: BlobWriter | None = None
        self._index = 0

    def take(self, digest: Digest, offset: int, data: bytes) -> bool:
        """Write one piece; True when it completed (and published) its blob."""
        writer = self._writer
        if writer is not None and writer.digest != digest:
            raise InvalidRequestError(
                f"blob {writer.digest}: stream moved on to {digest} after {writer.received} of "
                f"{writer.digest.size} bytes"
            )
        if writer is None:
            check_digest(digest, f"requests[{self._index}].digest")
            if offset != 0:
                raise InvalidRequestError(f"blob {digest}: first piece must start at offset 0, got {offset}")
            writer = self._writer = self._store.writer(digest)
        elif offset != writer.received:
            raise InvalidRequestError(f"blob {digest}: expected offset {writer.received}, got {offset}")
        self._index += 1
        writer.write(data)
        if writer.received < digest.size:
            return False
        writer.commit()
        self._writer = None
        return True

    def finish(self) -> None:
        """Refuse a stream that ended inside a blob (its partial file is removed by ``abort``)."""
        if self._writer is not None:
            writer = self._writer
            raise InvalidRequestError(
                f"blob {writer.digest}: stream ended after {writer.received} of {writer.digest.size} bytes"
            )

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None


class WorkerServicer(pb_grpc.WorkerServiceServicer):
    """Holds no business logic; errors are mapped to statuses by ``maps_errors``.

    Which thread runs what: every call into the store, and any work that grows with the
    request (translating a large action, checking many digests), runs on ``pool``, a small
    bounded executor the caller owns, so no request can hold the event loop (and with it
    every other call, health checks included) for long, and a flood of requests queues
    there instead of spawning threads. Everything else runs on the event loop."""

    def __init__(
        self,
        *,
        engine: ExecutionEngine,
        worker_id: str,
        limits: pb.WorkerLimits,
        pool: concurrent.futures.Executor,
        max_input_entries: int | None,
        max_digests_per_request: int,
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._limits = limits
        self._pool = pool
        self._max_input_entries = max_input_entries
        self._max_digests = max_digests_per_request

    @maps_errors
    async def Execute(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: pb.ExecuteRequest, context: Context
    ) -> None:
        entries = (files, directories, symlinks) = (
            len(request.input_files),
            len(request.input_directories),
            len(request.input_symlinks),
        )
        # Refused here, before translation spends time on it; the engine checks the same rule
        # for every front door.
        check_input_entries(files, directories, symlinks, self._max_input_entries)
        if sum(entries) <= INLINE_INPUT_ENTRIES:
            action = tr.action_from_pb(request)
        else:
            action = await BlockingCalls(self._pool).run(tr.action_from_pb, request)
        # aclosing: a vanished client cancels this task; the engine is closed (and the command
        # killed) right here, not whenever a suspended generator is garbage-collected. While
        # the outputs stream, the engine waits at the result it gave, holding them pinned.
        accepted: asyncio.Future[None] | None = None  # its write, while in flight
        try:
            async with contextlib.aclosing(self._engine.execute(action)) as events:
                async for event in events:
                    if isinstance(event, StageEntered):
                        continue  # this API tells stages by its own events (accepted, started, result)
                    message = tr.event_to_pb(event)
                    if isinstance(event, Accepted):
                        # Written while the engine goes on to start the command (one write in
                        # flight at a time: the next one waits for it below).
                        accepted = asyncio.ensure_future(send(context, message))
                        continue
                    if accepted is not None:
                        await accepted
                        accepted = None
                    if isinstance(event, ActionResult) and not request.omit_output_contents:
                        await self._stream_outputs(event, context)
                    await send(context, message)
            if accepted is not None:
                await accepted
        except BaseException as err:
            if accepted is not None:  # an error's status follows the accepted event, as it did
                cancelled = isinstance(err, asyncio.CancelledError)
                if cancelled:
                    accepted.cancel()
                with contextlib.suppress(CallGone, *((asyncio.CancelledError,) if cancelled else ())):
                    await accepted
            raise

    async def _stream_outputs(self, result: ActionResult, context: Context) -> None:
        """Each collected file's bytes, in chunks read from the store on the pool."""
        calls = BlockingCalls(self._pool)
        for f in result.outputs.files:
            chunks = await calls.run(self._engine.store.open_blob, f.digest)
            try:
                offset = 0
                while chunk := await calls.run(next, chunks, b""):
                    for piece in message_pieces(chunk):
                        await send(context, tr.event_to_pb(OutputChunk(f.path, offset, piece)))
                        offset += len(piece)
            finally:
                calls.finish(lambda chunks=chunks: _close(chunks))  # type: ignore[misc]

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
        upload = _Upload(self._engine.store)
        calls = BlockingCalls(self._pool)
        stored: list[pb.Digest] = []
        try:
            async for piece in request_iterator:
                digest = digest_from_pb(piece.digest)
                if await calls.run(upload.take, digest, piece.offset, piece.data):
                    stored.append(piece.digest)
            upload.finish()
        finally:
            calls.finish(upload.abort)
        return pb.UploadBlobsResponse(stored=stored)

    @maps_errors
    async def FindMissingBlobs(
        self, request: pb.FindMissingBlobsRequest, context: Context
    ) -> pb.FindMissingBlobsResponse:
        check_digest_count(len(request.digests), self._max_digests)
        return await BlockingCalls(self._pool).run(self._find_missing, request)

    def _find_missing(self, request: pb.FindMissingBlobsRequest) -> pb.FindMissingBlobsResponse:
        """Runs on the pool: a check and a stat per digest, and a reply as long as the request."""
        digests = digests_from_pb(request.digests)
        for i, d in enumerate(digests):
            check_digest(d, f"digests[{i}]")
        reply = pb.FindMissingBlobsResponse()
        add_digests(reply.missing_digests, self._engine.store.find_missing(digests))
        return reply

    @maps_errors
    async def ReadBlob(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: pb.ReadBlobRequest, context: Context
    ) -> None:
        digest = digest_from_pb(request.digest)
        check_digest(digest, "digest")
        calls = BlockingCalls(self._pool)
        chunks = await calls.run(self._engine.store.open_blob, digest)
        try:
            offset = 0
            while chunk := await calls.run(next, chunks, b""):
                for piece in message_pieces(chunk):
                    await send(context, pb.ReadBlobResponse(offset=offset, data=piece))
                    offset += len(piece)
        finally:
            calls.finish(lambda: _close(chunks))

    @maps_errors
    async def GetWorkerStatus(
        self, request: pb.GetWorkerStatusRequest, context: Context
    ) -> pb.GetWorkerStatusResponse:
        status = await self._engine.status()
        return pb.GetWorkerStatusResponse(
            status=tr.worker_status_to_pb(status, worker_id=self._worker_id, at=time.time())
        )

    @maps_errors
    async def WatchWorkerStatus(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: pb.WatchWorkerStatusRequest, context: Context
    ) -> None:
        """A status now, then one per change (changes within ``min_interval`` of the last status
        are sent together) or per heartbeat; ends after the first status that is not accepting."""
        min_interval, heartbeat = tr.watch_intervals_from_pb(request)
        changes = self._engine.status_changed
        loop = asyncio.get_running_loop()
        while True:
            status = await self._engine.status()
            pb_status = tr.worker_status_to_pb(status, worker_id=self._worker_id, at=time.time())
            await send(context, pb.WatchWorkerStatusResponse(status=pb_status))
            if not status.accepting:
                return
            sent_at = loop.time()
            await changes.wait(status.version, heartbeat)
            if (pause := sent_at + min_interval - loop.time()) > 0:
                await asyncio.sleep(pause)


def _close(chunks: Iterator[bytes]) -> None:
    """Close the blob's file now rather than when the garbage collector finds the generator."""
    if isinstance(chunks, Generator):
        chunks.close()
