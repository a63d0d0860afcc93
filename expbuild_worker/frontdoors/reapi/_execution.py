"""The REAPI Execution service: Execute and WaitExecution as streams of google.longrunning Operations."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
from dataclasses import dataclass

from google.longrunning import operations_pb2
from google.protobuf import any_pb2

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.engine import Execution, ExecutionEngine
from expbuild_worker.errors import InvalidRequestError, NotFoundError
from expbuild_worker.frontdoors._grpc import BlockingCalls
from expbuild_worker.frontdoors._remote_actions import (
    LoadedAction,
    cacheable,
    check_digest_function,
    digest_from_pb,
    digest_to_pb,
    error_to_status,
    execute_response,
    load_action,
    read_action,
)
from expbuild_worker.frontdoors.reapi._action_cache import cached_result
from expbuild_worker.frontdoors.reapi._errors import Context, maps_errors, send
from expbuild_worker.frontdoors.reapi._names import check_instance
from expbuild_worker.model import ActionResult, Digest, ExecutionStage
from expbuild_worker.storage import ActionCache, BlobStore

_log = logging.getLogger(__name__)

_STAGES = {
    ExecutionStage.QUEUED: re_pb.ExecutionStage.QUEUED,
    ExecutionStage.STAGING_INPUTS: re_pb.ExecutionStage.EXECUTING,
    ExecutionStage.RUNNING: re_pb.ExecutionStage.EXECUTING,
    ExecutionStage.COLLECTING_OUTPUTS: re_pb.ExecutionStage.EXECUTING,
    ExecutionStage.COMPLETED: re_pb.ExecutionStage.COMPLETED,
}
OPERATIONS = "operations"
"""The collection an Operation's name lives in: ``[{instance}/]operations/{execution id}``."""


@dataclass(eq=False)
class _Tracked:
    """An execution this front door started, and the one response every watcher of it gets."""

    loaded: LoadedAction
    execution: Execution
    response: asyncio.Future[re_pb.ExecuteResponse]


class ExecutionServicer(re_grpc.ExecutionServicer):
    """Runs actions through the engine with ``submit``: an action keeps running when the stream
    that started it drops, ``WaitExecution`` re-attaches by the Operation's name, and identical
    actions in flight run once (unless ``skip_cache_lookup``). Each execution's ExecuteResponse
    is built once, when it ends, whether or not anyone still watches, and a successful result is
    written to the action cache then.

    Refusals found before an Operation exists (a missing blob, a malformed Command, a platform
    the worker cannot give) end the call with their status; what happens while the action runs
    is in ``ExecuteResponse.status``.
    """

    def __init__(
        self,
        *,
        engine: ExecutionEngine,
        store: BlobStore,
        action_cache: ActionCache,
        instance_name: str,
        worker_name: str,
        pool: concurrent.futures.Executor | None,
        max_input_entries: int | None,
        result_blobs_kept_seconds: float,
        keep_responses: int = 1000,
    ) -> None:
        self._engine = engine
        self._store = store
        self._cache = action_cache
        self._instance = instance_name
        self._worker = worker_name
        self._pool = pool
        self._max_entries = max_input_entries
        self._keep_seconds = result_blobs_kept_seconds
        self._keep_responses = keep_responses
        self._tracked: collections.OrderedDict[str, _Tracked] = collections.OrderedDict()
        self._finishing: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Wait for responses still being built (they write the action cache)."""
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    @maps_errors
    async def Execute(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: re_pb.ExecuteRequest, context: Context
    ) -> None:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        digest = digest_from_pb(request.action_digest, "action_digest")
        # One trip to the pool: the Action, the cache, the Command and the input tree.
        prepared = await BlockingCalls(self._pool).run(self._prepare, digest, request.skip_cache_lookup)
        if isinstance(prepared, re_pb.ActionResult):
            response = re_pb.ExecuteResponse(result=prepared, cached_result=True)
            name = self._name(f"cached-{digest.sha256}")
            await send(context, self._operation(name, digest, response=response))
            return
        loaded, shared = prepared
        key = f"reapi:{self._instance}:{digest}" if shared else None
        execution = await self._engine.submit(loaded.action, key=key)
        tracked = self._track(loaded, execution)
        await self._stream(tracked, context)

    @maps_errors
    async def WaitExecution(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: re_pb.WaitExecutionRequest, context: Context
    ) -> None:
        execution_id = self._execution_id(request.name)
        tracked = self._tracked.get(execution_id)
        if tracked is None:
            raise NotFoundError(
                f"name: operation {request.name!r} is unknown to this worker (or ended long ago)"
            )
        await self._stream(tracked, context)

    def _prepare(
        self, digest: Digest, skip_cache_lookup: bool
    ) -> re_pb.ActionResult | tuple[LoadedAction, bool]:
        """On the pool: the cached result when there is a usable one and the action may be answered
        from the cache; else the loaded action and whether it may be shared with an identical one
        in flight. A do_not_cache action is neither answered from the cache nor shared."""
        reapi_action = read_action(self._store, digest)
        shared = not (skip_cache_lookup or reapi_action.do_not_cache)
        if shared:
            cached = cached_result(self._store, self._cache, digest, keep_seconds=self._keep_seconds)
            if cached is not None:
                return cached
        loaded = load_action(self._store, digest, reapi_action, max_input_entries=self._max_entries)
        return loaded, shared

    # ---- one execution's operations -------------------------------------------------------------

    def _track(self, loaded: LoadedAction, execution: Execution) -> _Tracked:
        """The tracking of ``execution``: new, or the one an identical action in flight already has."""
        known = self._tracked.get(execution.execution_id)
        if known is not None:
            return known
        tracked = _Tracked(loaded, execution, asyncio.get_running_loop().create_future())
        self._tracked[execution.execution_id] = tracked
        while len(self._tracked) > self._keep_responses:
            oldest = next(iter(self._tracked.values()))
            if not oldest.response.done():
                break
            self._tracked.popitem(last=False)
        finishing = asyncio.get_running_loop().create_task(self._finish(tracked))
        self._finishing.add(finishing)
        finishing.add_done_callback(self._finishing.discard)
        return tracked

    async def _finish(self, tracked: _Tracked) -> None:
        """Build the response once the execution ended, and cache a successful result."""
        execution = tracked.execution
        try:
            await execution.done.wait()
            result = execution.result
            if result is None:
                raise NotFoundError(f"execution {execution.execution_id} ended without a result")
            response = await BlockingCalls(self._pool).run(self._response, tracked.loaded, result)
        except Exception as err:
            _log.exception("building the response of %s failed", execution.execution_id)
            response = re_pb.ExecuteResponse(status=error_to_status(err))
        tracked.response.set_result(response)

    def _response(self, loaded: LoadedAction, result: ActionResult) -> re_pb.ExecuteResponse:
        """Runs on the pool: Tree blobs are written and the action cache too."""
        pin = self._store.pin(())
        try:
            response = execute_response(loaded, result, worker=self._worker, store=self._store, pin=pin)
            if cacheable(loaded, result):
                self._cache.put(loaded.digest, response.result.SerializeToString(deterministic=True))
        finally:
            pin.release_after(self._keep_seconds)
        return response

    async def _stream(self, tracked: _Tracked, context: Context) -> None:
        """An Operation for each stage seen, then the done one carrying the ExecuteResponse."""
        name, digest = self._name(tracked.execution.execution_id), tracked.loaded.digest
        sent = None
        async for stage in tracked.execution.watch():
            if stage is ExecutionStage.COMPLETED:
                break
            if _STAGES[stage] != sent:  # the engine's finer stages are all EXECUTING here
                sent = _STAGES[stage]
                await send(context, self._operation(name, digest, stage=sent))
        response = await asyncio.shield(tracked.response)
        await send(context, self._operation(name, digest, response=response))

    def _operation(
        self,
        name: str,
        digest: Digest,
        *,
        stage: re_pb.ExecutionStage.Value = re_pb.ExecutionStage.COMPLETED,
        response: re_pb.ExecuteResponse | None = None,
    ) -> operations_pb2.Operation:
        metadata = re_pb.ExecuteOperationMetadata(
            stage=stage, action_digest=digest_to_pb(digest), digest_function=re_pb.DigestFunction.SHA256
        )
        operation = operations_pb2.Operation(name=name, done=response is not None)
        operation.metadata.Pack(metadata)
        if response is not None:
            packed = any_pb2.Any()
            packed.Pack(response)
            operation.response.CopyFrom(packed)
        return operation

    def _name(self, execution_id: str) -> str:
        return (
            f"{self._instance}/{OPERATIONS}/{execution_id}"
            if self._instance
            else f"{OPERATIONS}/{execution_id}"
        )

    def _execution_id(self, name: str) -> str:
        prefix = self._name("")
        if not name.startswith(prefix) or not name[len(prefix) :]:
            raise InvalidRequestError(f"name: {name!r} is not an operation of this worker ({prefix}ID)")
        return name[len(prefix) :]
