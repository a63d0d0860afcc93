"""The execution engine: admits actions from every front door, keeps the table of executions, runs them."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass

from expbuild_worker.engine._action_log import CALLER
from expbuild_worker.engine._admission import Admission
from expbuild_worker.engine._executions import Execution, ExecutionTable
from expbuild_worker.engine._runner import ActionRunner
from expbuild_worker.engine._status import ExecutorStatus, StatusSignal, WorkerStatus, free_slots
from expbuild_worker.engine._work_root import DirectoryLock
from expbuild_worker.errors import (
    AlreadyExistsError,
    InvalidRequestError,
    MissingBlobsError,
    NotFoundError,
    PreconditionError,
    UnavailableError,
    WorkerError,
    name_some,
)
from expbuild_worker.execution.executor import Executor
from expbuild_worker.model import (
    Accepted,
    Action,
    ActionEvent,
    ActionResult,
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorSelector,
    LogChunk,
    Readiness,
    StageEntered,
    WarmupReport,
)
from expbuild_worker.storage import BlobPin, BlobStore
from expbuild_worker.validation import check_image_reference, validate_action

_log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, kw_only=True)
class EngineLimits:
    """Worker-wide rules every action is admitted by, whatever the front door."""

    max_inline_input_bytes: int
    max_timeout_seconds: float
    max_input_entries: int | None = None


_VALIDATE_IN_THREAD_ENTRIES = 256
"""Actions with more input entries are validated on a thread: the work grows with the request,
and the event loop must keep answering every other call (health included) meanwhile. Smaller
ones are checked inline, where a thread hop would cost more than the checks."""


class ExecutionEngine:
    """Admits actions, keeps every execution in a table, and runs each through the action runner.

    Knows nothing of any wire protocol. Two ways to run an action, one per front-door policy:
    ``execute`` is driven by its caller, who receives every event and whose going away kills
    the action (the own API); ``submit`` runs the action on its own, so it outlives the call
    that started it, and identical actions in flight (same key) run once (REAPI, the bot).
    Either way a refusal is a WorkerError before anything runs, and an admitted action ends
    with exactly one ``ActionResult``.
    """

    def __init__(
        self,
        *,
        executors: Mapping[str, Executor],
        default_executor: str,
        store: BlobStore,
        runner: ActionRunner,
        limits: EngineLimits,
        admission: Admission,
        table: ExecutionTable | None = None,
        directory_locks: Sequence[DirectoryLock] = (),
    ) -> None:
        if default_executor not in executors:
            raise ValueError(f"default executor {default_executor!r} is not among {sorted(executors)}")
        self._executors = dict(executors)
        self._default = default_executor
        self.store = store
        self._runner = runner
        self.limits = limits
        self.admission = admission
        self._table = table or ExecutionTable()
        self._caps: dict[str, ExecutorCapabilities] = {}
        self._drivers: set[asyncio.Task[None]] = set()
        self._accepting = True
        self._locks = tuple(directory_locks)
        self.admitted_total = 0
        """Actions admitted since start (each ran, or was cancelled while queued)."""
        self.refusals: collections.Counter[str] = collections.Counter()
        """Actions refused at admission since start, by the WorkerError type that refused them."""
        self.status_changed = StatusSignal()
        """Bumped when ``status()`` would answer differently: admitted, finished, readiness, shutdown."""
        self._readiness: dict[str, Readiness] = {}

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Prepare the runner (clears what a previous run left behind) and learn each executor's limits."""
        await self._runner.start()
        for name, executor in self._executors.items():
            self._caps[name] = await executor.capabilities()

    @property
    def active_count(self) -> int:
        """Actions admitted and not finished: running or queued."""
        return len(self._table)

    @property
    def queued_count(self) -> int:
        return sum(not e.ticket.running for e in self._table.active())

    def cancel_all(self, *, queued_only: bool = False) -> None:
        """Stop every admitted action (or only those still queued) with CANCELLED."""
        for execution in self._table.active():
            if not queued_only or not execution.ticket.running:
                execution.stop.request(ExecutionStatus.CANCELLED)

    def stop_accepting(self) -> None:
        """Refuse new actions from now on (UNAVAILABLE); running ones continue."""
        self._accepting = False
        self.status_changed.bump()

    async def shutdown(self, grace_seconds: float) -> None:
        """Stop accepting, cancel what is still queued (it never started), give running actions
        ``grace_seconds``, cancel the rest, close executors. ``cancel_all`` cuts the grace short."""
        self.stop_accepting()
        self.cancel_all(queued_only=True)
        await self._until_idle(grace_seconds)
        self.cancel_all()
        await self._until_idle(30)
        if self._drivers:
            await asyncio.gather(*self._drivers, return_exceptions=True)
        await self._runner.close()
        for executor in self._executors.values():
            try:
                await executor.close()
            except Exception:
                _log.exception("closing executor %s failed", executor.name)
        for lock in self._locks:  # last: nothing of ours is left in the directories
            lock.release()

    async def _until_idle(self, seconds: float) -> None:
        """Wait until every admitted action has finished, or ``seconds`` have passed."""
        waits = [asyncio.ensure_future(e.done.wait()) for e in self._table.active()]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=seconds)
            for waiter in pending:
                waiter.cancel()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def default_executor(self) -> str:
        return self._default

    async def readiness(self) -> dict[str, Readiness]:
        """Whether each executor can run an action now, and why not."""
        readiness = {name: await executor.readiness() for name, executor in self._executors.items()}
        if readiness != self._readiness:
            self._readiness = readiness
            self.status_changed.bump()
        return readiness

    async def status(self) -> WorkerStatus:
        """What runs, what waits, what is free, and which executors are ready (and why not)."""
        readiness = await self.readiness()
        admission = self.admission
        running, queued = admission.running, admission.queued
        free = free_slots(max_running=admission.max_running, running=running, queued=queued)
        executors = []
        for name, ready in readiness.items():
            own, cap = admission.running_for(name), admission.cap_for(name)
            executors.append(
                ExecutorStatus(
                    name=name,
                    readiness=ready,
                    running=own,
                    max_concurrency=cap,
                    free_slots=min(free, max(0, cap - own)) if cap else free,
                )
            )
        return WorkerStatus(
            running=running,
            queued=queued,
            max_running=admission.max_running,
            max_queued=admission.max_queued,
            accepting=self._accepting,
            executors=tuple(executors),
            version=self.status_changed.version,
        )

    async def capabilities(self) -> list[ExecutorCapabilities]:
        caps = [await ex.capabilities() for ex in self._executors.values()]
        self._caps.update({c.name: c for c in caps})
        return caps

    async def warmup(self, executors: Sequence[str], images: Sequence[str]) -> list[WarmupReport]:
        for i, name in enumerate(executors):  # numbered as the caller sent them
            if name not in self._executors:
                raise InvalidRequestError(
                    f"executors[{i}]: unknown executor {name!r}; have {sorted(self._executors)}"
                )
        names = list(dict.fromkeys(executors)) or list(self._executors)
        for i, image in enumerate(images):
            check_image_reference(image, f"images[{i}]")
        return [await self._executors[name].warmup(images) for name in names]

    def cancel(self, execution_id: str) -> None:
        """Ask a queued or running action to stop with CANCELLED; NotFoundError when unknown."""
        execution = self._table.get_active(execution_id)
        if execution is None:
            raise NotFoundError(f"execution {execution_id!r} is not queued or running on this worker")
        execution.stop.request(ExecutionStatus.CANCELLED)

    def get(self, execution_id: str) -> Execution:
        """A running or recently finished execution; NotFoundError when unknown or forgotten."""
        execution = self._table.get(execution_id)
        if execution is None:
            raise NotFoundError(
                f"execution {execution_id!r} is unknown to this worker (or finished long ago)"
            )
        return execution

    # ---- running actions ---------------------------------------------------------------------

    async def execute(self, action: Action) -> AsyncGenerator[ActionEvent, None]:
        """Admit ``action`` and yield its events: ``Accepted`` first, the result last.

        The caller drives the action: closing this generator early kills the command."""
        execution = await self._admit(action, key=None)
        try:
            async for event in self._events(execution):
                yield event
        finally:
            self._finished(execution)

    async def submit(self, action: Action, *, key: str | None = None) -> Execution:
        """Admit ``action`` and run it on its own; watch it with ``Execution.watch``.

        With a ``key``, an identical action already queued or running is returned instead of
        running a second one. The execution keeps running when its callers go away; only
        ``cancel`` (or shutdown) stops it. Live log chunks are dropped: ask for ``capture_logs``."""
        if key is not None and (running := self._table.in_flight(key)) is not None:
            return running
        execution = await self._admit(action, key=key)
        execution.detached = True
        driver = asyncio.get_running_loop().create_task(self._drive(execution))
        self._drivers.add(driver)
        driver.add_done_callback(self._drivers.discard)
        return execution

    async def _drive(self, execution: Execution) -> None:
        try:
            async for event in self._events(execution):
                if not isinstance(event, LogChunk):
                    _log.debug("%s: %s", execution.execution_id, type(event).__name__)
        except Exception:
            _log.exception("running %s failed", execution.execution_id)
        finally:
            self._finished(execution)

    async def _events(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        executor, ticket = execution.executor, execution.ticket
        yield Accepted(execution.execution_id, executor.name, executor.isolation, ticket.queue_position)
        async with contextlib.aclosing(self._runner.run(execution)) as events:
            async for event in events:
                if isinstance(event, StageEntered):
                    execution.enter(event.stage)
                elif isinstance(event, ActionResult):
                    execution.result = event
                yield event

    def _finished(self, execution: Execution) -> None:
        execution.inputs.release()
        self.admission.release(execution.ticket)
        execution.finish(execution.result)
        self._table.finished(execution)
        self.status_changed.bump()

    # ---- admission -----------------------------------------------------------------------------

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

    async def _admit(self, action: Action, *, key: str | None) -> Execution:
        """``_admit_or_refuse``, counting each refusal by its type (for metrics)."""
        try:
            execution = await self._admit_or_refuse(action, key=key)
        except WorkerError as err:
            self.refusals[type(err).__name__] += 1
            raise
        self.status_changed.bump()
        return execution

    async def _admit_or_refuse(self, action: Action, *, key: str | None) -> Execution:
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
            if self._table.get_active(action.execution_id) is not None:
                raise AlreadyExistsError(f"execution {action.execution_id!r} is already queued or running")
            execution = Execution(
                action=action,
                executor=executor,
                limits=action.limits.with_defaults(caps.default_limits),
                ticket=self.admission.reserve(name),
                admitted_at=time.time(),
                inputs=inputs,
                key=key,
                caller=CALLER.get(),
            )
        except BaseException:
            inputs.release()
            raise
        self._table.add(execution)
        self.admitted_total += 1
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
            raise MissingBlobsError(
                f"{name_some(fields)}: {len(err.digests)} blob(s) are not in the worker's store "
                f"({name_some(err.digests)}); upload them and send the action again",
                digests=err.digests,
            ) from None
