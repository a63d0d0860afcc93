"""One lease's work: its Action from the scheduler's CAS, run by the engine, its result back in that CAS."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2, status_pb2

from expbuild_worker import errors
from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.engine import Execution, ExecutionEngine
from expbuild_worker.frontdoors._grpc import BlockingCalls
from expbuild_worker.frontdoors._remote_actions import (
    LoadedAction,
    digest_from_pb,
    error_to_status,
    execute_response,
    load_action,
    read_action,
)
from expbuild_worker.model import ActionResult, Digest, ExecutionStatus
from expbuild_worker.storage import RemoteStore

_log = logging.getLogger(__name__)

HANDED_BACK = "handed back by the bot"
"""Start of the message of a lease the bot gives back unfinished (shutting down, no room)."""


@dataclass
class LeaseTimes:
    """Wall-clock seconds of one lease's steps, for metadata, logs and the overhead it adds."""

    received: float = field(default_factory=time.time)
    inputs_ready: float | None = None
    result: float | None = None
    uploaded: float | None = None
    command_seconds: float = 0.0

    def overhead_seconds(self, reported: float) -> float:
        """Time from receiving the lease to its result being reported, minus the command's own run."""
        return max(0.0, reported - self.received - self.command_seconds)


@dataclass(eq=False)
class HeldLease:
    """A lease the bot holds, from its arrival until the scheduler has taken its outcome."""

    lease_id: str
    payload: any_pb2.Any
    session: str
    """The name of the session the lease came with (a lost session's leases are orphans)."""
    times: LeaseTimes = field(default_factory=LeaseTimes)
    action: str = ""
    """The action digest, once read from the payload (for logs)."""
    execution: Execution | None = None
    withdrawn: str | None = None
    """Why the lease was taken back (the scheduler cancelled it, the bot is stopping); None while wanted."""
    outcome: LeaseOutcome | None = None
    task: asyncio.Task[None] | None = None


@dataclass
class LeaseOutcome:
    """What a COMPLETED lease carries: the ActionResult (None when the action never ran) and a status."""

    status: status_pb2.Status
    result: re_pb.ActionResult | None = None


def payload_digest(payload: any_pb2.Any) -> tuple[Digest, bytes | None]:
    """The action digest a lease's payload names, and the Action's bytes when it carries them.

    BuildGrid sends the Action itself or its Digest; both are accepted. InvalidRequestError for
    anything else.
    """
    if payload.TypeName() == re_pb.Action.DESCRIPTOR.full_name:
        # The packed bytes are the Action as the scheduler serialized it: stored as they are, so
        # the Command and input root it names are found whatever the field order.
        return Digest.of_bytes(payload.value), payload.value
    if payload.TypeName() == re_pb.Digest.DESCRIPTOR.full_name:
        digest = re_pb.Digest()
        payload.Unpack(digest)
        return digest_from_pb(digest, "lease.payload"), None
    raise errors.InvalidRequestError(
        "lease.payload: expected a build.bazel.remote.execution.v2.Action or Digest, "
        f"got {payload.type_url!r}"
    )


def outcome_of_error(err: BaseException) -> LeaseOutcome:
    """A lease's status when it failed before a result: what the scheduler retries is retried.

    A full queue or an unreachable CAS is UNAVAILABLE (BuildGrid leases the action again, maybe
    to another bot); missing inputs are FAILED_PRECONDITION naming them, as the REAPI has it (the
    client uploads them and executes again); a malformed action is INVALID_ARGUMENT; a fault of
    the worker is INTERNAL (retried too).
    """
    if isinstance(err, errors.ResourceExhaustedError | errors.UnavailableError):
        return LeaseOutcome(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=str(err)))
    return LeaseOutcome(error_to_status(err))


def handed_back(why: str) -> LeaseOutcome:
    """The outcome of a lease given back unfinished: UNAVAILABLE, which BuildGrid retries."""
    return LeaseOutcome(status_pb2.Status(code=code_pb2.UNAVAILABLE, message=f"{HANDED_BACK}: {why}"))


class LeaseWork:
    """Runs leased actions through the engine; inputs come from the scheduler's CAS, outputs go there.

    ``run`` is one lease from payload to outcome; it never raises (a failure is an outcome) except
    when cancelled. The engine runs the action with ``submit``: it outlives the lease's task, and
    two leases of one action in flight share one execution.
    """

    def __init__(
        self,
        *,
        engine: ExecutionEngine,
        store: RemoteStore,
        instance_name: str,
        worker_name: str,
        pool: concurrent.futures.Executor | None,
        max_input_entries: int | None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._instance = instance_name
        self._worker = worker_name
        self._pool = pool
        self._max_entries = max_input_entries

    async def run(self, held: HeldLease, started: Callable[[HeldLease], None]) -> LeaseOutcome:
        """The lease's outcome; ``started`` is told once the engine admitted its action.

        Never cancelled mid-step (a blocking call's thread could not be stopped, and what it
        pinned would leak): a lease taken back sets ``held.withdrawn``, checked between steps,
        and its execution is stopped through the engine.
        """
        calls = BlockingCalls(self._pool)
        times = held.times
        try:
            digest, action_bytes = payload_digest(held.payload)
            held.action = str(digest)
            loaded = await calls.run(self._load, digest, action_bytes)
            if held.withdrawn is not None:
                return handed_back(held.withdrawn)
            inputs = await calls.run(
                self._store.pin, [f.digest for f in loaded.action.input_files if f.digest is not None]
            )
            try:
                times.inputs_ready = time.time()
                if held.withdrawn is not None:
                    return handed_back(held.withdrawn)
                # do_not_cache: never merged with an identical action in flight, as over REAPI.
                key = None if loaded.do_not_cache else f"bot:{self._instance}:{digest}"
                execution = await self._engine.submit(loaded.action, key=key)
            finally:
                inputs.release()  # the engine holds its own pins from admission
            held.execution = execution
            started(held)
            _log.info(
                "lease %s: action %s running as execution %s on executor %s",
                held.lease_id,
                digest,
                execution.execution_id,
                execution.executor.name,
            )
            await execution.done.wait()
            result = execution.result
            if result is None:
                raise errors.InternalError(f"execution {execution.execution_id} ended without a result")
            times.result = time.time()
            if result.times.command_start is not None and result.times.command_end is not None:
                times.command_seconds = result.times.command_end - result.times.command_start
            if result.status is ExecutionStatus.CANCELLED:
                return handed_back(f"the action was stopped on this worker ({result.message})")
            response = await calls.run(self._report, loaded, result, times)
        except Exception as err:
            if not isinstance(err, errors.WorkerError):
                _log.exception("lease %s: action %s failed", held.lease_id, held.action or "?")
            return outcome_of_error(err)
        return LeaseOutcome(response.status, response.result)

    def _load(self, digest: Digest, action_bytes: bytes | None) -> LoadedAction:
        """On a thread: the Action (from the lease, else from the CAS), its Command and input tree."""
        if action_bytes is None:
            reapi_action = read_action(self._store, digest)
        else:
            try:
                reapi_action = re_pb.Action.FromString(action_bytes)
            except DecodeError as err:
                raise errors.InvalidRequestError(f"lease.payload: blob {digest} is not an Action") from err
        return load_action(self._store, digest, reapi_action, max_input_entries=self._max_entries)

    def _report(self, loaded: LoadedAction, result: ActionResult, times: LeaseTimes) -> re_pb.ExecuteResponse:
        """On a thread: the REAPI result, its Tree blobs made, every blob it names sent to the scheduler."""
        local = self._store.local
        pin = local.pin(())
        try:
            response = execute_response(loaded, result, worker=self._worker, store=local, pin=pin)
            named = [f.digest for f in result.outputs.files]
            named += [d for d in (result.stdout_digest, result.stderr_digest) if d is not None]
            for digest in named:
                pin.add(digest)  # held until sent, however long the scheduler's CAS takes
            upload_start = time.time()
            self._store.upload(pin.digests)
            times.uploaded = time.time()
        finally:
            pin.release()
        metadata = response.result.execution_metadata
        _stamp(metadata.worker_start_timestamp, times.received)
        _stamp(metadata.input_fetch_start_timestamp, times.received)
        _stamp(metadata.input_fetch_completed_timestamp, times.inputs_ready)
        _stamp(metadata.output_upload_start_timestamp, upload_start)
        _stamp(metadata.output_upload_completed_timestamp, times.uploaded)
        _stamp(metadata.worker_completed_timestamp, times.uploaded)
        return response


def _stamp(field: Timestamp, at: float | None) -> None:
    if at is not None:
        field.FromNanoseconds(int(at * 1e9))
