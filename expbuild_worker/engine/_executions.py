"""Admitted actions and the table that keeps them, running and recently finished, apart from any stream."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from expbuild_worker.engine._admission import Ticket
from expbuild_worker.execution.executor import Executor, StopSignal
from expbuild_worker.model import Action, ActionResult, ExecutionStage, ResourceLimits
from expbuild_worker.storage import BlobPin


@dataclass(eq=False)
class Execution:
    """One admitted action: what runs it, with which limits (defaults applied), and where it is.

    The engine updates ``stage`` and ``result``; any number of front-door calls may ``watch``
    it (a REAPI ``WaitExecution`` re-attaching after its first stream dropped, say). Watching
    never slows the action: a watcher sees the latest stage, not every intermediate one.
    """

    action: Action
    executor: Executor
    limits: ResourceLimits
    ticket: Ticket
    admitted_at: float
    inputs: BlobPin
    """The input blobs, pinned from admission until they are staged: never evicted while queued."""
    key: str | None = None
    """What identifies identical actions (a REAPI action digest); None = never shared."""
    caller: str = ""
    """Who asked for it (a token's name), for the action log."""
    detached: bool = False
    """Runs on its own (``ExecutionEngine.submit``): callers re-attach to it, so once finished it
    is kept for a while; an execution driven by its caller is forgotten when it ends."""
    stop: StopSignal = dataclasses.field(default_factory=StopSignal)
    stage: ExecutionStage = ExecutionStage.QUEUED
    result: ActionResult | None = None
    finished_at: float | None = None
    done: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    _changed: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def execution_id(self) -> str:
        return self.action.execution_id

    def enter(self, stage: ExecutionStage) -> None:
        self.stage = stage
        self._wake()

    def finish(self, result: ActionResult | None) -> None:
        """Record the end (``None``: ended without a result, its consumer gone) and wake watchers."""
        self.result = result
        self.stage = ExecutionStage.COMPLETED
        self.finished_at = time.monotonic()
        # Kept for a while in the table (WaitExecution): without what only running needed, so
        # a thousand finished actions with large inline inputs or stdin cost little memory.
        self.action = dataclasses.replace(
            self.action, input_files=(), input_directories=(), input_symlinks=(), stdin=b"", environment={}
        )
        self.done.set()
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def watch(self) -> AsyncIterator[ExecutionStage]:
        """The current stage at once, then each later one seen, ending after COMPLETED."""
        seen: ExecutionStage | None = None
        while True:
            changed = self._changed
            if self.stage is not seen:
                seen = self.stage
                yield seen
            if self.done.is_set():
                if seen is not ExecutionStage.COMPLETED:
                    yield ExecutionStage.COMPLETED
                return
            await changed.wait()


class ExecutionTable:
    """Executions by id: every running one, and finished detached ones until ``keep_finished``
    newer ones have finished or ``finished_ttl_seconds`` have passed, so a caller may still fetch
    a result after its stream dropped. Identical actions in flight are found by their key."""

    def __init__(self, *, keep_finished: int = 1000, finished_ttl_seconds: float = 600.0) -> None:
        self._keep = keep_finished
        self._ttl = finished_ttl_seconds
        self._active: dict[str, Execution] = {}
        self._by_key: dict[str, Execution] = {}
        self._finished: collections.OrderedDict[str, Execution] = collections.OrderedDict()

    def __len__(self) -> int:
        """Executions running or queued."""
        return len(self._active)

    def active(self) -> list[Execution]:
        return list(self._active.values())

    def is_known(self, execution_id: str) -> bool:
        return execution_id in self._active or execution_id in self._finished

    def add(self, execution: Execution) -> None:
        self._active[execution.execution_id] = execution
        if execution.key is not None:
            self._by_key[execution.key] = execution

    def get(self, execution_id: str) -> Execution | None:
        """A running or recently finished execution."""
        self._prune()
        return self._active.get(execution_id) or self._finished.get(execution_id)

    def get_active(self, execution_id: str) -> Execution | None:
        return self._active.get(execution_id)

    def in_flight(self, key: str) -> Execution | None:
        """A running or queued execution of the action identified by ``key``."""
        return self._by_key.get(key)

    def finished(self, execution: Execution) -> None:
        """Move ``execution`` from running to recently finished."""
        self._active.pop(execution.execution_id, None)
        if execution.key is not None and self._by_key.get(execution.key) is execution:
            del self._by_key[execution.key]
        if execution.detached:
            self._finished[execution.execution_id] = execution
            self._prune()

    def _prune(self) -> None:
        horizon = time.monotonic() - self._ttl
        while self._finished:
            oldest = next(iter(self._finished.values()))
            if len(self._finished) <= self._keep and (oldest.finished_at or 0.0) >= horizon:
                return
            self._finished.popitem(last=False)
