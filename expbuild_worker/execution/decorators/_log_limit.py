"""Cap the log bytes streamed per stream: past the cap stop reading, and optionally end the action."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator

from expbuild_worker.execution.decorators._base import ExecutorDecorator
from expbuild_worker.execution.executor import Command, Executor, OutputHolding, StopSignal
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorEvent,
    LogChunk,
    LogStream,
    LogSummary,
    RunOutcome,
)

LIMIT_KEY = "execution.max_log_bytes_per_stream"


class LogLimitingExecutor(ExecutorDecorator):
    """Passes each stream's first ``max_bytes_per_stream`` bytes; past the cap the output is no
    longer read.

    The moment a stream has more than the cap, the inner executor is asked to hold the action's
    output (``OutputHolding``): the worker stops reading, so the command's next writes block,
    exactly as a slow consumer blocks it, instead of the worker spending a core reading and
    discarding a runaway log. The command then ends by itself (a command that wrote a little
    more than the cap and exits completes normally: its last bytes are in the pipes, and are
    counted) or by its timeout. With ``end_action`` the action is instead ended at once: a stop
    with reason OUTPUT_LIMIT_EXCEEDED, and the result's message names the stream and the cap.

    The outcome's LogSummary says how much was read (``size_bytes``: all the command wrote,
    unless it was still writing when it was held and stopped), how much was streamed, and
    whether the stream was truncated. An inner executor that cannot hold is read to the end,
    every byte counted.
    """

    def __init__(self, inner: Executor, *, max_bytes_per_stream: int, end_action: bool = False) -> None:
        super().__init__(inner)
        self.max_bytes = max_bytes_per_stream
        self.end_action = end_action

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        written = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        streamed = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        capped: LogStream | None = None
        events = self.inner.execute(command, stop)
        try:
            async for event in events:
                if isinstance(event, LogChunk):
                    written[event.stream] += len(event.data)
                    room = self.max_bytes - streamed[event.stream]
                    if capped is None and written[event.stream] > self.max_bytes:
                        capped = event.stream
                        self._cap_reached(stop)
                    if room <= 0:
                        continue
                    data = event.data[:room]
                    streamed[event.stream] += len(data)
                    yield event if len(data) == len(event.data) else dataclasses.replace(event, data=data)
                elif isinstance(event, RunOutcome):
                    yield dataclasses.replace(
                        event,
                        message=self._message(event, capped, stop),
                        stdout=_summary(written[LogStream.STDOUT], streamed[LogStream.STDOUT]),
                        stderr=_summary(written[LogStream.STDERR], streamed[LogStream.STDERR]),
                    )
                else:
                    yield event
        finally:
            with contextlib.suppress(RuntimeError):
                await events.aclose()

    def _cap_reached(self, stop: StopSignal) -> None:
        if self.end_action:
            stop.request(ExecutionStatus.OUTPUT_LIMIT_EXCEEDED)
        if isinstance(self.inner, OutputHolding):
            self.inner.hold_output(stop)

    def _message(self, outcome: RunOutcome, capped: LogStream | None, stop: StopSignal) -> str:
        """The outcome's message, with why the action was ended or held when the cap did it."""
        if capped is None or outcome.status is ExecutionStatus.COMPLETED:
            return outcome.message
        reached = f"{capped.value} reached the log cap of {self.max_bytes} bytes ({LIMIT_KEY})"
        if outcome.status is ExecutionStatus.OUTPUT_LIMIT_EXCEEDED and stop.reason is outcome.status:
            note = f'{reached}; execution.on_log_limit is "end-action"'
        elif isinstance(self.inner, OutputHolding):
            note = f"{reached}; its output was no longer read from then on, so its writes blocked"
        else:
            return outcome.message
        return f"{note}; {outcome.message}" if outcome.message else note


def _summary(written: int, streamed: int) -> LogSummary:
    return LogSummary(size_bytes=written, streamed_bytes=streamed, truncated=written > streamed)
