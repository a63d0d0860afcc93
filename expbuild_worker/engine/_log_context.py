"""Every log line about an action carries its execution id: a decorator over the action runner."""

from __future__ import annotations

from collections.abc import AsyncGenerator

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._runner import RunnerDecorator
from expbuild_worker.logging_setup import EXECUTION_ID
from expbuild_worker.model import ActionEvent


class ExecutionIdRunner(RunnerDecorator):
    """Sets ``EXECUTION_ID`` while the runners and executor it wraps work on an action, so the
    engine's, the executors' and the decorators' log lines name the action without each call
    spelling it out (threads and tasks started meanwhile copy it).

    Set and reset around each step of the inner generator rather than once around the whole
    run: a generator's body runs in the context of whoever resumes it, and a front door may
    resume and close it from different tasks; the id must neither leak into the caller's lines
    between events nor fail to reset in a context it was not set in.
    """

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        events = self._inner.run(execution)
        try:
            while True:
                token = EXECUTION_ID.set(execution.execution_id)
                try:
                    event = await events.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    EXECUTION_ID.reset(token)
                yield event
        finally:
            token = EXECUTION_ID.set(execution.execution_id)
            try:
                await events.aclose()  # the command is killed and cleaned up with the id set
            finally:
                EXECUTION_ID.reset(token)
