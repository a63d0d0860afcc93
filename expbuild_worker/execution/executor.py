"""The one small interface every executor implements, and what it is given to run."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    Readiness,
    ResourceLimits,
    WarmupReport,
)


class StopSignal:
    """Asks a running command to stop, with the reason its result must carry.

    The first request wins: a timeout that fires after a cancellation does not turn a
    CANCELLED result into TIMED_OUT.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._reason: ExecutionStatus | None = None
        self._callbacks: list[Callable[[ExecutionStatus], None]] = []

    def request(self, reason: ExecutionStatus) -> None:
        if self._reason is None:
            self._reason = reason
            self._event.set()
            for callback in self._callbacks:
                callback(reason)

    def on_request(self, callback: Callable[[ExecutionStatus], None]) -> Callable[[], None]:
        """Call ``callback(reason)`` when a stop is requested (at once if it already was); returns
        a function that unregisters it. Cheaper than a task waiting per action on the hot path."""
        if self._reason is not None:
            callback(self._reason)
            return lambda: None
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    @property
    def reason(self) -> ExecutionStatus | None:
        """TIMED_OUT or CANCELLED once requested, else None."""
        return self._reason

    async def wait(self) -> ExecutionStatus:
        await self._event.wait()
        assert self._reason is not None
        return self._reason


@dataclass(frozen=True, slots=True)
class Command:
    """What an executor runs.

    ``root`` is a host directory the engine created and staged with the inputs; the
    executor runs ``argv`` with ``root / working_directory`` as its working directory and,
    when it returns its outcome, every path in ``output_paths`` that the command created must
    be present under ``root`` (an executor that runs elsewhere copies them back).
    ``environment`` is complete: nothing of the worker's own environment is added.
    ``limits`` already carry the executor's defaults. ``timeout_seconds`` is enforced by the
    deadline decorator through ``stop``; executors need not read it.
    """

    execution_id: str
    argv: Sequence[str]
    environment: Mapping[str, str]
    root: Path
    working_directory: str
    stdin: bytes
    limits: ResourceLimits
    output_paths: Sequence[str] = ()
    max_output_bytes: int | None = None
    """The most file bytes the outputs may hold; an executor that copies outputs back stops at it."""
    image: str | None = None
    platform_properties: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: float | None = None
    recycle_runner: bool = False
    """The action may run in a recycled pool container (see ``Action.recycle_runner``)."""


class Executor(Protocol):
    """Runs commands with one kind of isolation.

    ``execute`` yields a ``Started`` event, then ``LogChunk`` events as the command writes
    (each stream's chunks contiguous, in order, batched, at most 1 MiB each), then exactly one
    ``RunOutcome``. When ``stop`` is requested the executor kills the command (every process
    it started) and ends with an outcome whose status is ``stop.reason`` (OOM_KILLED wins if
    the kernel already killed something for memory). If the consumer closes the iterator
    early, the executor kills the command and releases everything before returning.
    A non-zero exit is an outcome, never an exception; exceptions mean the infrastructure
    failed (they should be ``WorkerError`` subclasses with a clear message).
    """

    @property
    def name(self) -> str: ...

    @property
    def isolation(self) -> IsolationLevel: ...

    async def readiness(self) -> Readiness: ...

    async def capabilities(self) -> ExecutorCapabilities: ...

    async def warmup(self, images: Sequence[str]) -> WarmupReport: ...

    def check(self, limits: ResourceLimits, image: str | None) -> None:
        """Refuse up front what ``execute`` would refuse for these limits (defaults applied) and
        this image: raise PreconditionError naming the field. Called for every action before it
        is accepted, on the event loop, so it must be quick and never block."""
        ...

    def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]: ...

    async def close(self) -> None:
        """Release daemon connections and remove anything still running; idempotent."""
        ...


@runtime_checkable
class OutputHolding(Protocol):
    """An executor that can stop reading one action's output until the action ends.

    An optional capability of an ``Executor``; the log-limiting decorator must wrap such an
    executor directly (it asks its inner executor). ``hold_output(stop)`` names the action by
    the ``StopSignal`` it was started with. What was already read is still delivered; once the
    pipes (or the Docker daemon's stream) are full, the command's writes block. When the command
    ends, by itself or by a stop, what the pipes still hold is read and the outcome follows.
    """

    def hold_output(self, stop: StopSignal) -> None: ...
