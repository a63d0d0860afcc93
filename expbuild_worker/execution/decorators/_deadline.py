"""Enforce ``Command.timeout_seconds`` by requesting a TIMED_OUT stop when the deadline passes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator

from expbuild_worker.execution.decorators._base import ExecutorDecorator
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.model import ExecutionStatus, ExecutorEvent, Started


class DeadlineExecutor(ExecutorDecorator):
    """The clock starts at the inner executor's ``Started`` event, so queueing, staging and
    image preparation never eat into an action's own time. Every executor gets the same
    timeout semantics because none of them implements it."""

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        timer: asyncio.TimerHandle | None = None
        events = self.inner.execute(command, stop)
        try:
            async for event in events:
                if isinstance(event, Started) and command.timeout_seconds is not None and timer is None:
                    timer = asyncio.get_running_loop().call_later(
                        command.timeout_seconds, stop.request, ExecutionStatus.TIMED_OUT
                    )
                yield event
        finally:
            if timer is not None:
                timer.cancel()
            with contextlib.suppress(RuntimeError):
                await events.aclose()
