"""The action runner: an admitted action's stages — wait, stage inputs, run, collect outputs, report."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._outputs import collect_outputs
from expbuild_worker.engine._staging import StagingStopped, stage_inputs
from expbuild_worker.engine._workdirs import ActionDirectories
from expbuild_worker.errors import OutputLimitExceeded, ResourceExhaustedError, WorkerError
from expbuild_worker.execution.executor import Command
from expbuild_worker.model import (
    Action,
    ActionEvent,
    ActionResult,
    ExecutionStage,
    ExecutionStatus,
    LogChunk,
    LogStream,
    LogSummary,
    OutputManifest,
    ResourceUsage,
    RunOutcome,
    StageEntered,
    StageTimes,
)
from expbuild_worker.storage import BlobPin, BlobStore

_log = logging.getLogger(__name__)


class ActionRunner(Protocol):
    """Takes one admitted action from its queue to its result.

    ``run`` yields ``StageEntered`` for each stage in order (QUEUED first, COMPLETED right
    before the result), the executor's ``Started`` and ``LogChunk`` events, and exactly one
    ``ActionResult`` last; it never raises for anything the action did. Closing the generator
    early (the consumer is gone) kills the command and cleans up before it returns. Decorators
    (timestamps, log capture, metrics) wrap a runner and pass these events through.
    """

    def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]: ...

    async def start(self) -> None:
        """Get ready before the first action (and clear what a previous run left behind)."""
        ...

    async def close(self) -> None:
        """Wait for clean-ups still running and release what the runner keeps ready."""
        ...


class RunnerDecorator:
    """Hands ``start`` and ``close`` to the runner it wraps; a subclass wraps ``run`` only."""

    def __init__(self, inner: ActionRunner) -> None:
        self._inner = inner

    async def start(self) -> None:
        await self._inner.start()

    async def close(self) -> None:
        await self._inner.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class RunnerLimits:
    max_output_bytes: int
    default_timeout_seconds: float
    staging_timeout_seconds: float
    output_retention_seconds: float
    """How long outputs stay pinned after a result whose caller reads them later."""


_NOTHING_TO_COLLECT = (ExecutionStatus.FAILED_TO_START, ExecutionStatus.OUTPUT_LIMIT_EXCEEDED)
"""Outcomes after which outputs are not collected: the command never ran, or its executor
already found the outputs too large to bring back."""


@dataclass
class _CommandRun:
    """What the run stage learnt: the executor's outcome and the log bytes that passed."""

    outcome: RunOutcome | None = None
    counted: dict[LogStream, int] = field(default_factory=lambda: {LogStream.STDOUT: 0, LogStream.STDERR: 0})


class LocalActionRunner:
    """Runs actions in fresh directories under the work root with the admitted executor.

    Stage times are not taken here: ``TimestampingRunner`` stamps the stage events.
    """

    def __init__(self, *, store: BlobStore, directories: ActionDirectories, limits: RunnerLimits) -> None:
        self._store = store
        self._directories = directories
        self._limits = limits
        self._closing: set[asyncio.Future[None]] = set()

    async def start(self) -> None:
        """Clear action directories a previous run left behind and make the first spares."""
        await self._directories.start()

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self._directories.close()

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        yield StageEntered(ExecutionStage.QUEUED)
        if not await self._wait_for_slot(execution):
            yield StageEntered(ExecutionStage.COMPLETED)
            yield _early_result(execution, ExecutionStatus.CANCELLED, "cancelled while queued")
            return
        root = self._directories.acquire()
        try:
            yield StageEntered(ExecutionStage.STAGING_INPUTS)
            failure = await self._stage_inputs(execution, root)
            if failure is not None:
                yield StageEntered(ExecutionStage.COMPLETED)
                yield failure
                return
            yield StageEntered(ExecutionStage.RUNNING)
            async with contextlib.aclosing(self._run_staged(execution, root)) as events:
                async for event in events:
                    yield event
        finally:
            self._directories.release(root)

    # ---- the stages -------------------------------------------------------------------------

    async def _wait_for_slot(self, execution: Execution) -> bool:
        """Wait in the admission queue; False when stopped (cancelled, shut down) before a slot came."""
        ticket, stop = execution.ticket, execution.stop
        if ticket.running:
            return True
        stop_wait: asyncio.Future[object] = asyncio.ensure_future(stop.wait())
        waits: set[asyncio.Future[object]] = {ticket.granted, stop_wait}  # type: ignore[arg-type]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        return ticket.running

    async def _stage_inputs(self, execution: Execution, root: Path) -> ActionResult | None:
        """Materialise the inputs; a result when staging stopped or failed, None when done."""
        action, stop = execution.action, execution.stop
        try:
            if _has_inputs(action):
                await self._stage_on_thread(execution, root)
            return None
        except StagingStopped:
            if stop.reason is ExecutionStatus.TIMED_OUT:
                message = (
                    f"staging inputs took longer than {self._limits.staging_timeout_seconds:g}s "
                    "(execution.staging_timeout_seconds)"
                )
            else:
                message = "stopped while staging inputs"
            return _early_result(execution, stop.reason or ExecutionStatus.CANCELLED, message)
        except (OSError, WorkerError) as err:  # disk full, a blob that vanished behind the store
            _log.warning("staging inputs of %s failed: %s", action.execution_id, err)
            return _early_result(execution, ExecutionStatus.INTERNAL, f"staging inputs failed: {err}")
        finally:
            execution.inputs.release()  # staged copies are the action's own now

    async def _stage_on_thread(self, execution: Execution, root: Path) -> None:
        """A stop request or a cancelled caller (the client went away) stops staging at the next
        entry; a cancelled caller also waits for the thread to stop, so the action's directory is
        never removed while the thread still writes into it. The staging deadline is a stop like
        any other."""
        stop = execution.stop
        halt = threading.Event()
        forget_stop = stop.on_request(lambda _reason: halt.set())
        deadline = asyncio.get_running_loop().call_later(
            self._limits.staging_timeout_seconds, stop.request, ExecutionStatus.TIMED_OUT
        )
        staging = asyncio.ensure_future(
            asyncio.to_thread(stage_inputs, execution.action, root, self._store, halt)
        )
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

    async def _run_staged(self, execution: Execution, root: Path) -> AsyncGenerator[ActionEvent, None]:
        """Run the command, collect its outputs, report; the executor's clean-up runs after the report."""
        action = execution.action
        command = self._command(execution, root)
        run = _CommandRun()
        # Outputs are pinned as they enter the store, so no other action's blobs evict them before
        # the caller has them; a caller that reads them after the result keeps them a while longer.
        outputs = self._store.pin(())
        events = execution.executor.execute(command, execution.stop)
        try:
            async for event in self._run_command(execution, events, run):
                yield event
            assert run.outcome is not None
            yield StageEntered(ExecutionStage.COLLECTING_OUTPUTS)
            manifest, status, message = await self._collect_outputs(execution, command, run.outcome, outputs)
            yield StageEntered(ExecutionStage.COMPLETED)
            yield _report(execution, run, manifest, status, message)
        finally:
            if action.retain_outputs and run.outcome is not None:
                outputs.release_after(self._limits.output_retention_seconds)
            else:
                outputs.release()
            if run.outcome is None:
                await events.aclose()  # stopped early: the executor kills the command now
            else:
                # The command is over: the executor's clean-up (a cgroup, a container) runs after
                # the report instead of delaying it; close() waits for it.
                closing = asyncio.ensure_future(events.aclose())
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)

    def _command(self, execution: Execution, root: Path) -> Command:
        action = execution.action
        return Command(
            execution_id=action.execution_id,
            argv=action.argv,
            environment=action.environment,
            root=root,
            working_directory=action.working_directory,
            stdin=action.stdin,
            limits=execution.limits,
            output_paths=(*action.output_files, *action.output_directories, *action.output_paths),
            max_output_bytes=self._limits.max_output_bytes,
            image=action.image,
            platform_properties=action.platform_properties,
            timeout_seconds=action.timeout_seconds or self._limits.default_timeout_seconds,
            recycle_runner=action.recycle_runner,
        )

    async def _run_command(
        self, execution: Execution, events: AsyncGenerator[object, None], run: _CommandRun
    ) -> AsyncGenerator[ActionEvent, None]:
        """Pass the executor's events on until its outcome; a failing executor is an INTERNAL outcome."""
        name = execution.executor.name
        try:
            async for event in events:
                if isinstance(event, RunOutcome):
                    run.outcome = event
                    return
                if isinstance(event, LogChunk):
                    run.counted[event.stream] += len(event.data)
                yield event  # type: ignore[misc]  # Started or LogChunk, by the executor contract
        except WorkerError:
            raise
        except Exception as err:
            _log.exception("executor %s failed on %s", name, execution.execution_id)
            run.outcome = RunOutcome(
                status=ExecutionStatus.INTERNAL, message=f"executor {name} failed: {err}"
            )
            return
        run.outcome = RunOutcome(
            status=ExecutionStatus.INTERNAL, message=f"executor {name} ended without an outcome"
        )

    async def _collect_outputs(
        self, execution: Execution, command: Command, outcome: RunOutcome, pin: BlobPin
    ) -> tuple[OutputManifest, ExecutionStatus, str]:
        """Bring the outputs into the store. Nothing here hides the command's exit code: caps and
        faults change the status or add a note, and unreadable outputs are named in the manifest."""
        action = execution.action
        status, message = outcome.status, outcome.message
        if not command.output_paths or status in _NOTHING_TO_COLLECT:
            return OutputManifest(), status, message
        try:
            manifest = await asyncio.to_thread(
                collect_outputs,
                command.root,
                output_files=action.output_files,
                output_directories=action.output_directories,
                output_paths=action.output_paths,
                store=self._store,
                max_bytes=self._limits.max_output_bytes,
                pin=pin,
            )
        except (OutputLimitExceeded, ResourceExhaustedError) as err:  # over the cap, or the store is full
            if status is ExecutionStatus.COMPLETED:
                return OutputManifest(), ExecutionStatus.OUTPUT_LIMIT_EXCEEDED, str(err)
            # timed out, cancelled, out of memory: that stays the headline
            return (
                OutputManifest(),
                status,
                f"{message}; outputs not collected: {err}" if message else str(err),
            )
        except Exception:  # a fault of ours: the command's own result still counts
            error_id = uuid.uuid4().hex[:12]
            _log.exception("collecting outputs of %s failed (error id %s)", action.execution_id, error_id)
            note = f"outputs not collected: internal worker error (error id {error_id})"
            if status is ExecutionStatus.COMPLETED:
                status = ExecutionStatus.INTERNAL
            return OutputManifest(), status, f"{message}; {note}" if message else note
        return manifest, status, message


def _has_inputs(action: Action) -> bool:
    return bool(
        action.input_files or action.input_symlinks or action.input_directories or action.working_directory
    )


def _report(
    execution: Execution, run: _CommandRun, manifest: OutputManifest, status: ExecutionStatus, message: str
) -> ActionResult:
    outcome = run.outcome
    assert outcome is not None
    stdout = outcome.stdout or LogSummary(run.counted[LogStream.STDOUT], run.counted[LogStream.STDOUT])
    stderr = outcome.stderr or LogSummary(run.counted[LogStream.STDERR], run.counted[LogStream.STDERR])
    return ActionResult(
        execution_id=execution.execution_id,
        status=status,
        message=_message(message, manifest, stdout=stdout, stderr=stderr),
        exit_code=outcome.exit_code,
        signal=outcome.signal,
        outputs=manifest,
        stdout=stdout,
        stderr=stderr,
        usage=outcome.usage,
        times=StageTimes(command_start=outcome.started_at, command_end=outcome.ended_at),
        executor=execution.executor.name,
        isolation=execution.executor.isolation,
    )


def _early_result(execution: Execution, status: ExecutionStatus, message: str) -> ActionResult:
    """The result of an action whose command never ran."""
    return ActionResult(
        execution_id=execution.execution_id,
        status=status,
        message=message,
        exit_code=None,
        signal=None,
        outputs=OutputManifest(),
        stdout=LogSummary(),
        stderr=LogSummary(),
        usage=ResourceUsage(),
        times=StageTimes(),
        executor=execution.executor.name,
        isolation=execution.executor.isolation,
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
