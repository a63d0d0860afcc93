"""Stage timestamps for every action, taken in one place: a decorator over the action runner."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncGenerator

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._runner import RunnerDecorator
from expbuild_worker.model import ActionEvent, ActionResult, ExecutionStage, StageEntered, StageTimes


class TimestampingRunner(RunnerDecorator):
    """Stamps the wall-clock time at which the action entered each stage into its result.

    The inner runner reports only what it alone can know: when the command really started and
    ended (the executor's own times). Everything else comes from the stage events as they pass,
    so no stage of the runner takes a timestamp by hand, and metrics read the result alone.
    """

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        stamps: dict[ExecutionStage, float] = {}
        async for event in self._inner.run(execution):
            if isinstance(event, StageEntered):
                stamps[event.stage] = time.time()
            elif isinstance(event, ActionResult):
                yield dataclasses.replace(event, times=_times(execution, stamps, event.times))
                continue
            yield event


def _times(execution: Execution, stamps: dict[ExecutionStage, float], command: StageTimes) -> StageTimes:
    started = ExecutionStage.STAGING_INPUTS in stamps
    return StageTimes(
        queued=execution.admitted_at,
        worker_start=stamps.get(ExecutionStage.STAGING_INPUTS),
        left_queue=None if started else stamps.get(ExecutionStage.COMPLETED),
        inputs_staged=stamps.get(ExecutionStage.RUNNING),
        command_start=command.command_start,
        command_end=command.command_end,
        outputs_started=stamps.get(ExecutionStage.COLLECTING_OUTPUTS),
        outputs_collected=(
            stamps.get(ExecutionStage.COMPLETED) if ExecutionStage.COLLECTING_OUTPUTS in stamps else None
        ),
    )


STAGES = ("queued", "input_staging", "execution", "output_collection")
"""The stages whose durations ``stage_durations`` gives, in order (plus ``total``)."""


def stage_durations(times: StageTimes, *, ended: float | None = None) -> dict[str, float | None]:
    """Seconds spent in each stage an action passed (None for a stage it never passed), and
    ``total`` from admission to ``ended`` (the moment its result was reported) when given.

    The one reading of stage times: the action log and the metrics both use it."""

    def span(start: float | None, end: float | None) -> float | None:
        return max(0.0, end - start) if start is not None and end is not None else None

    return {
        "queued": span(times.queued, times.worker_start or times.left_queue),
        "input_staging": span(times.worker_start, times.inputs_staged),
        "execution": span(times.command_start, times.command_end),
        "output_collection": span(times.outputs_started, times.outputs_collected),
        "total": span(times.queued, ended),
    }
