"""The execution engine: admit, stage, execute, collect, report, clean up — for every front door."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.engine._admission import Admission, Ticket
from expbuild_worker.engine._outputs import OutputLimitExceeded, collect_outputs
from expbuild_worker.engine._staging import StagingStopped, stage_inputs
from expbuild_worker.engine._work_root import DirectoryLock
from expbuild_worker.engine._workdirs import ActionDirectories
from expbuild_worker.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    MissingBlobsError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
    UnavailableError,
    WorkerError,
)
from expbuild_worker.execution.executor import Command, Executor, StopSignal
from expbuild_worker.model import (
    Accepted,
    Action,
    ActionEvent,
    ActionResult,
    Digest,
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorSelector,
    LogChunk,
    LogStream,
    LogSummary,
    OutputChunk,
    OutputManifest,
    ResourceLimits,
    ResourceUsage,
    RunOutcome,
    StageTimes,
    WarmupReport,
)
from expbuild_worker.storage import BlobPin, ContentAddressedStore
from expbuild_worker.validation import check_image_reference, validate_action

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLimits:
    """Worker-wide caps applied to every action, whatever the front door."""

    max_inline_input_bytes: int
    max_output_bytes: int
    default_timeout_seconds: float
    max_timeout_seconds: float
    max_input_entries: int | None = None
    staging_timeout_seconds: float = 600.0
    output_retention_seconds: float = 300.0
    """How long outputs stay pinned after a result that did not carry their contents."""


_VALIDATE_IN_THREAD_ENTRIES = 256
"""Actions with more input entries are validated on a thread: the work grows with the request,
and the event loop must keep answering every other call (health included) meanwhile. Smaller
ones are checked inline, where a thread hop would cost more than the checks."""


_NAMED_MISSING = 10
"""How many missing blobs a refusal names (the rest are counted; ``MissingBlobsError.digests`` has all)."""

_NOTHING_TO_COLLECT = (ExecutionStatus.FAILED_TO_START, ExecutionStatus.OUTPUT_LIMIT_EXCEEDED)
"""Outcomes after which outputs are not collected: the command never ran, or its executor
already found the outputs too large to bring back."""


@dataclass(eq=False)
class _Execution:
    """An admitted action: what runs it, with which limits (defaults applied), and its state."""

    action: Action
    executor: Executor
    limits: ResourceLimits
    ticket: Ticket
    admitted_at: float
    inputs: BlobPin
    """The input blobs, pinned from admission until they are staged: never evicted while queued."""
    stop: StopSignal = dataclasses.field(default_factory=StopSignal)
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


class ExecutionEngine:
    """Runs actions through: validate → admit → stage → execute → collect → report → clean up.

    Knows nothing of any wire protocol. ``execute`` either raises a WorkerError before its
    first event (the action was refused) or yields ``Accepted`` first and exactly one
    ``ActionResult`` last; the action directory is removed on every path, including a
    consumer that stops iterating (the client went away), which kills the command.
    """

    def __init__(
        self,
        *,
        executors: Mapping[str, Executor],
        default_executor: str,
        store: ContentAddressedStore,
        work_root: Path,
        limits: EngineLimits,
        admission: Admission,
        directory_locks: Sequence[DirectoryLock] = (),
    ) -> None:
        if default_executor not in executors:
            raise ValueError(f"default executor {default_executor!r} is not among {sorted(executors)}")
        self._executors = dict(executors)
        self._default = default_executor
        self.store = store
        self._directories = ActionDirectories(root=work_root / "actions")
        self.limits = limits
        self.admission = admission
        self._caps: dict[str, ExecutorCapabilities] = {}
        self._active: dict[str, _Execution] = {}
        self._closing: set[asyncio.Future[None]] = set()
        self._accepting = True
        self._locks = tuple(directory_locks)

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Clear action directories a previous run left behind and learn each executor's limits."""
        await self._directories.start()
        for name, executor in self._executors.items():
            self._caps[name] = await executor.capabilities()

    @property
    def active_count(self) -> int:
        """Actions admitted and not finished: running or queued."""
        return len(self._active)

    @property
    def queued_count(self) -> int:
        return sum(not e.ticket.running for e in self._active.values())

    def cancel_all(self, *, queued_only: bool = False) -> None:
        """Stop every admitted action (or only those still queued) with CANCELLED."""
        for execution in list(self._active.values()):
            if not queued_only or not execution.ticket.running:
                execution.stop.request(ExecutionStatus.CANCELLED)

    def stop_accepting(self) -> None:
        """Refuse new actions from now on (UNAVAILABLE); running ones continue."""
        self._accepting = False

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting, cancel what is still queued (it never started), give running actions
        ``grace_seconds``, cancel the rest, close executors. ``cancel_all`` cuts the grace short."""
        self.stop_accepting()
        self.cancel_all(queued_only=True)
        await self._until_idle(grace_seconds)
        self.cancel_all()
        await self._until_idle(30)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for executor in self._executors.values():
            try:
                await executor.close()
            except Exception:
                _log.exception("closing executor %s failed", executor.name)
        await self._directories.close()
        for lock in self._locks:  # last: nothing of ours is left in the directories
            lock.release()

    async def _until_idle(self, seconds: float) -> None:
        """Wait until every admitted action has finished, or ``seconds`` have passed."""
        waits = [asyncio.ensure_future(e.done.wait()) for e in self._active.values()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=seconds)
            for waiter in pending:
                waiter.cancel()

    # ---- queries ---------------------------------------------------------------------------

    async def capabilities(self) -> list[ExecutorCapabilities]:
        caps = [await ex.capabilities() for ex in self._executors.values()]
        self._caps.update({c.name: c for c in caps})
        return caps

    async def warmup(self, executors: Sequence[str], images: Sequence[str]) -> list[WarmupReport]:
        names = list(dict.fromkeys(executors)) or list(self._executors)
        for i, name in enumerate(names):
            if name not in self._executors:
                raise InvalidRequestError(
                    f"executors[{i}]: unknown executor {name!r}; have {sorted(self._executors)}"
                )
        for i, image in enumerate(images):
            check_image_reference(image, f"images[{i}]")
        return [await self._executors[name].warmup(images) for name in names]

    def cancel(self, execution_id: str) -> None:
        """Ask a queued or running action to stop with CANCELLED; NotFoundError when unknown."""
        execution = self._active.get(execution_id)
        if execution is None:
            raise NotFoundError(f"execution {execution_id!r} is not queued or running on this worker")
        execution.stop.request(ExecutionStatus.CANCELLED)

    # ---- the path of an action ---------------------------------------------------------------

    def _select(self, selector: ExecutorSelector) -> str:
        if selector.name:
            if selector.name not in self._executors:
                raise InvalidRequestError(
                    f"executor.name: unknown executor {selector.name!r}; available: {list(self._executors)}"
                )
            chosen = self._executors[selector.name]
            if selector.min_isolation is not None and chosen.isolation < selector.min_isolation:
                raise PreconditionError(
                    f"executor {selector.name!r} provides isolation {chosen.isolation.name}, below the "
                    f"requested minimum {selector.min_isolation.name}"
                )
            return selector.name
        if selector.min_isolation is not None:
            fits = [ex for ex in self._executors.values() if ex.isolation >= selector.min_isolation]
            if not fits:
                raise PreconditionError(
                    f"no executor provides isolation {selector.min_isolation.name} or stronger; available: "
                    + ", ".join(f"{ex.name} ({ex.isolation.name})" for ex in self._executors.values())
                )
            return min(fits, key=lambda ex: ex.isolation).name
        return self._default

    async def _admit(self, action: Action) -> _Execution:
        """Everything that may refuse an action happens here, before its first event.

        Work that grows with the request (path rules, pinning thousands of inputs) runs on a
        thread for large actions; the checks that read shared state (shutting down, duplicate
        id, a free place in the queue) run on the event loop after it, with no await between
        them and the reservation."""
        if not self._accepting:
            raise UnavailableError("worker is shutting down and accepts no new actions")
        if not action.execution_id:
            action = dataclasses.replace(action, execution_id=uuid.uuid4().hex)
        name = self._select(action.executor)
        caps = self._caps[name]
        executor = self._executors[name]
        entries = len(action.input_files) + len(action.input_directories) + len(action.input_symlinks)
        if entries > _VALIDATE_IN_THREAD_ENTRIES:
            inputs = await asyncio.to_thread(self._check_and_pin, action, name, caps, executor)
        else:
            inputs = self._check_and_pin(action, name, caps, executor)
        try:
            if not self._accepting:
                raise UnavailableError("worker is shutting down and accepts no new actions")
            if action.execution_id in self._active:
                raise AlreadyExistsError(f"execution {action.execution_id!r} is already queued or running")
            execution = _Execution(
                action=action,
                executor=executor,
                limits=action.limits.with_defaults(caps.default_limits),
                ticket=self.admission.reserve(name),
                admitted_at=time.time(),
                inputs=inputs,
            )
        except BaseException:
            inputs.release()
            raise
        self._active[action.execution_id] = execution
        return execution

    def _check_and_pin(
        self, action: Action, name: str, caps: ExecutorCapabilities, executor: Executor
    ) -> BlobPin:
        """Validate ``action`` and pin its input blobs; MissingBlobsError names exactly the absent ones."""
        validate_action(
            action,
            max_inline_input_bytes=self.limits.max_inline_input_bytes,
            max_timeout_seconds=self.limits.max_timeout_seconds,
            max_limits=caps.max_limits,
            executor=name,
            max_input_entries=self.limits.max_input_entries,
        )
        executor.check(action.limits.with_defaults(caps.default_limits), action.image)
        wanted = [f.digest for f in action.input_files if f.digest is not None]
        try:
            return self.store.pin(wanted)
        except MissingBlobsError as err:
            missing = set(err.digests)
            fields = [
                f"input_files[{i}].digest"
                for i, f in enumerate(action.input_files)
                if f.digest is not None and f.digest in missing
            ]
            named = ", ".join(fields[:_NAMED_MISSING]) + (
                f" and {len(fields) - _NAMED_MISSING} more" if len(fields) > _NAMED_MISSING else ""
            )
            raise MissingBlobsError(
                f"{named}: {len(err.digests)} blob(s) are not in the worker's store "
                f"({', '.join(str(d) for d in err.digests[:_NAMED_MISSING])}"
                f"{' …' if len(err.digests) > _NAMED_MISSING else ''}); upload them with UploadBlobs "
                "and send the action again",
                digests=err.digests,
            ) from None

    async def execute(self, action: Action) -> AsyncGenerator[ActionEvent, None]:
        execution = await self._admit(action)
        action, executor, ticket = execution.action, execution.executor, execution.ticket
        try:
            yield Accepted(action.execution_id, executor.name, executor.isolation, ticket.queue_position)
            async with contextlib.aclosing(self._run(execution)) as events:
                async for event in events:
                    yield event
        finally:
            execution.inputs.release()
            self.admission.release(ticket)
            del self._active[action.execution_id]
            execution.done.set()

    async def _run(self, execution: _Execution) -> AsyncGenerator[ActionEvent, None]:
        action, executor, ticket, stop = (
            execution.action,
            execution.executor,
            execution.ticket,
            execution.stop,
        )
        queued = execution.admitted_at
        if not ticket.running:
            stop_wait: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
            waits: set[asyncio.Future[object]] = {ticket.granted, stop_wait}  # type: ignore[arg-type]
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_wait.cancel()
            if not ticket.running:
                yield self._result(
                    action,
                    executor,
                    ExecutionStatus.CANCELLED,
                    "cancelled while queued",
                    times=StageTimes(queued=queued, left_queue=time.time()),
                )
                return
        worker_start = time.time()
        root = self._directories.acquire()
        try:
            if (
                action.input_files
                or action.input_symlinks
                or action.input_directories
                or action.working_directory
            ):
                try:
                    await self._stage(action, root, stop)
                except (StagingStopped, OSError, WorkerError) as err:  # stopped, too slow, disk full
                    if isinstance(err, StagingStopped):
                        status, message = (
                            stop.reason or ExecutionStatus.CANCELLED,
                            "stopped while staging inputs",
                        )
                        if stop.reason is ExecutionStatus.TIMED_OUT:
                            message = (
                                f"staging inputs took longer than {self.limits.staging_timeout_seconds:g}s "
                                "(execution.staging_timeout_seconds)"
                            )
                    else:
                        _log.warning("staging inputs of %s failed: %s", action.execution_id, err)
                        status, message = ExecutionStatus.INTERNAL, f"staging inputs failed: {err}"
                    times = StageTimes(queued=queued, worker_start=worker_start)
                    yield self._result(action, executor, status, message, times=times)
                    return
                finally:
                    execution.inputs.release()  # staged copies are the action's own now
            times = StageTimes(queued=queued, worker_start=worker_start, inputs_staged=time.time())
            async with contextlib.aclosing(self._run_staged(execution, root, times)) as events:
                async for event in events:
                    yield event
        finally:
            self._directories.release(root)

    async def _stage(self, action: Action, root: Path, stop: StopSignal) -> None:
        """Stage on a worker thread. A stop request or a cancelled caller (the client went away)
        stops it at the next file; a cancelled caller also waits for the thread to stop, so the
        action's directory is never removed while the thread still writes into it."""
        halt = threading.Event()
        forget_stop = stop.on_request(lambda _reason: halt.set())
        # The staging deadline is a stop like any other: the thread sees it at its next step.
        deadline = asyncio.get_running_loop().call_later(
            self.limits.staging_timeout_seconds, stop.request, ExecutionStatus.TIMED_OUT
        )
        staging = asyncio.ensure_future(asyncio.to_thread(stage_inputs, action, root, self.store, halt))
        try:
            await asyncio.shield(staging)
        except asyncio.CancelledError:
            halt.set()
            await asyncio.wait({staging})
            if not staging.cancelled():
                staging.exception()  # retrieved: StagingStopped or a failure nobody waits for now
            raise
        finally:
            deadline.cancel()
            forget_stop()

    async def _run_staged(
        self, execution: _Execution, root: Path, times: StageTimes
    ) -> AsyncGenerator[ActionEvent, None]:
        action, executor, stop = execution.action, execution.executor, execution.stop
        command = Command(
            execution_id=action.execution_id,
            argv=action.argv,
            environment=action.environment,
            root=root,
            working_directory=action.working_directory,
            stdin=action.stdin,
            limits=execution.limits,
            output_paths=(*action.output_files, *action.output_directories),
            max_output_bytes=self.limits.max_output_bytes,
            image=action.image,
            platform_properties=action.platform_properties,
            timeout_seconds=action.timeout_seconds or self.limits.default_timeout_seconds,
        )
        outcome: RunOutcome | None = None
        counted = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        # Outputs are pinned as they enter the store, so no other action's blobs can evict them
        # before they are streamed; a result without their contents keeps them for a while.
        outputs = self.store.pin(())
        events = executor.execute(command, stop)
        try:
            try:
                async for event in events:
                    if isinstance(event, RunOutcome):
                        outcome = event
                        break
                    if isinstance(event, LogChunk):
                        counted[event.stream] += len(event.data)
                    yield event
            except WorkerError:
                raise
            except Exception as err:
                _log.exception("executor %s failed on %s", executor.name, action.execution_id)
                outcome = RunOutcome(
                    status=ExecutionStatus.INTERNAL, message=f"executor {executor.name} failed: {err}"
                )
            if outcome is None:
                outcome = RunOutcome(
                    status=ExecutionStatus.INTERNAL,
                    message=f"executor {executor.name} ended without an outcome",
                )
            times = dataclasses.replace(times, command_start=outcome.started_at, command_end=outcome.ended_at)

            manifest = OutputManifest()
            status, message = outcome.status, outcome.message
            if command.output_paths and status not in _NOTHING_TO_COLLECT:
                try:
                    manifest = await asyncio.to_thread(
                        collect_outputs,
                        root,
                        output_files=action.output_files,
                        output_directories=action.output_directories,
                        store=self.store,
                        max_bytes=self.limits.max_output_bytes,
                        pin=outputs,
                    )
                except (OutputLimitExceeded, ResourceExhaustedError) as err:  # over the cap, or the store
                    if status is ExecutionStatus.COMPLETED:
                        status, message = ExecutionStatus.OUTPUT_LIMIT_EXCEEDED, str(err)
                    else:  # timed out, cancelled, out of memory: that stays the headline
                        message = f"{message}; outputs not collected: {err}" if message else str(err)
                except Exception:  # a fault of ours: the command's own result still counts
                    error_id = uuid.uuid4().hex[:12]
                    _log.exception(
                        "collecting outputs of %s failed (error id %s)", action.execution_id, error_id
                    )
                    note = f"outputs not collected: internal worker error (error id {error_id})"
                    if status is ExecutionStatus.COMPLETED:
                        status = ExecutionStatus.INTERNAL
                    message = f"{message}; {note}" if message else note
            times = dataclasses.replace(times, outputs_collected=time.time())

            if action.stream_output_contents:
                for f in manifest.files:
                    async for offset, chunk in self._blob_chunks(f.digest):
                        yield OutputChunk(f.path, offset, chunk)
            stdout = outcome.stdout or LogSummary(counted[LogStream.STDOUT], counted[LogStream.STDOUT])
            stderr = outcome.stderr or LogSummary(counted[LogStream.STDERR], counted[LogStream.STDERR])
            yield ActionResult(
                execution_id=action.execution_id,
                status=status,
                message=_message(message, manifest, stdout=stdout, stderr=stderr),
                exit_code=outcome.exit_code,
                signal=outcome.signal,
                outputs=manifest,
                stdout=stdout,
                stderr=stderr,
                usage=outcome.usage,
                times=times,
                executor=executor.name,
                isolation=executor.isolation,
            )
        finally:
            if action.stream_output_contents or outcome is None:
                outputs.release()
            else:
                outputs.release_after(self.limits.output_retention_seconds)
            if outcome is None:
                await events.aclose()  # stopped early: the executor kills the command now
            else:
                # The command is over: the executor's clean-up (a cgroup, a container) runs after
                # the report instead of delaying it; shutdown waits for it.
                closing = asyncio.ensure_future(events.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    async def _blob_chunks(self, digest: Digest) -> AsyncGenerator[tuple[int, bytes], None]:
        """A stored blob's chunks with their offsets, each read on a thread (never on the loop)."""
        chunks = await asyncio.to_thread(self.store.open_blob, digest)
        offset = 0
        try:
            while chunk := await asyncio.to_thread(next, chunks, b""):
                yield offset, chunk
                offset += len(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    @staticmethod
    def _result(
        action: Action, executor: Executor, status: ExecutionStatus, message: str, *, times: StageTimes
    ) -> ActionResult:
        return ActionResult(
            execution_id=action.execution_id,
            status=status,
            message=message,
            exit_code=None,
            signal=None,
            outputs=OutputManifest(),
            stdout=LogSummary(),
            stderr=LogSummary(),
            usage=ResourceUsage(),
            times=times,
            executor=executor.name,
            isolation=executor.isolation,
        )


def _message(ending: str, manifest: OutputManifest, *, stdout: LogSummary, stderr: LogSummary) -> str:
    """A result's message: how the action ended, then what was left out of its logs and outputs."""
    notes = [ending] if ending else []
    for name, summary in (("stdout", stdout), ("stderr", stderr)):
        if summary.truncated:
            notes.append(
                f"{name} truncated: {summary.streamed_bytes} of {summary.size_bytes} bytes streamed "
                "(execution.max_log_bytes_per_stream)"
            )
    if manifest.problems:
        notes.append("outputs that could not be collected: " + "; ".join(manifest.problems))
    if manifest.unreportable:
        skipped = ", ".join(f"'{path}'" for path in manifest.unreportable)  # already escaped
        more = manifest.unreportable_count - len(manifest.unreportable)
        notes.append(
            f"not collected, their names or symlink targets are not UTF-8: {skipped}"
            + (f" and {more} more" if more > 0 else "")
        )
    return "; ".join(notes)
