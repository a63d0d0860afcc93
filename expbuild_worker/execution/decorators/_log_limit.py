"""Cap the log bytes streamed per stream; count everything, flag truncation, never drop silently."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import AsyncGenerator

from expbuild_worker.execution.decorators._base import ExecutorDecorator
from expbuild_worker.execution.executor import Command, Executor, StopSignal
from expbuild_worker.model import ExecutorEvent, LogChunk, LogStream, LogSummary, RunOutcome


class LogLimitingExecutor(ExecutorDecorator):
    """Passes each stream's first ``max_bytes_per_stream`` bytes, then only counts.

    The command keeps running past the cap (its output is a log, not a contract); the
    outcome's LogSummary says how much it wrote, how much was streamed, and that the stream
    was truncated.
    """

    def __init__(self, inner: Executor, *, max_bytes_per_stream: int) -> None:
        super().__init__(inner)
        self.max_bytes = max_bytes_per_stream

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        written = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        streamed = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        events = self.inner.execute(command, stop)
        try:
            async for event in events:
                if isinstance(event, LogChunk):
                    written[event.stream] += len(event.data)
                    room = self.max_bytes - streamed[event.stream]
                    if room <= 0:
                        continue
                    data = event.data[:room]
                    streamed[event.stream] += len(data)
                    yield event if len(data) == len(event.data) else dataclasses.replace(event, data=data)
                elif isinstance(event, RunOutcome):
                    yield dataclasses.replace(
                        event,
                        stdout=_summary(written[LogStream.STDOUT], streamed[LogStream.STDOUT]),
                        stderr=_summary(written[LogStream.STDERR], streamed[LogStream.STDERR]),
                    )
                else:
                    yield event
        finally:
            with contextlib.suppress(RuntimeError):
                await events.aclose()


def _summary(written: int, streamed: int) -> LogSummary:
    return LogSummary(size_bytes=written, streamed_bytes=streamed, truncated=written > streamed)
