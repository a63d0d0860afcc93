"""Prometheus metrics of actions: a decorator over the action runner, reading each result."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._runner import ActionRunner, RunnerDecorator
from expbuild_worker.engine._timestamps import stage_durations
from expbuild_worker.model import ActionEvent, ActionResult, ExecutionStatus

if TYPE_CHECKING:
    from expbuild_worker.engine._engine import ExecutionEngine

STAGE_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
)
"""Seconds: from a host action's millisecond stages to hour-long builds."""


class ActionMetrics:
    """The per-action metrics of one worker, in the registry it is given (one per worker, so
    several workers in one process never share or collide)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.actions = Counter(
            "expbuild_worker_actions",
            "Actions finished, by executor and status (completed includes non-zero exit codes).",
            ["executor", "status"],
            registry=registry,
        )
        self.stage_seconds = Histogram(
            "expbuild_worker_action_stage_duration_seconds",
            "Seconds finished actions spent per stage: queued, input_staging, execution, "
            "output_collection, and total (admission to result).",
            ["executor", "stage"],
            buckets=STAGE_BUCKETS,
            registry=registry,
        )
        self.log_bytes = Counter(
            "expbuild_worker_log_bytes",
            "Bytes finished actions wrote to stdout and stderr (including any beyond the cap).",
            ["executor", "stream"],
            registry=registry,
        )
        self.output_bytes = Counter(
            "expbuild_worker_output_bytes",
            "Bytes of output files collected from finished actions.",
            ["executor"],
            registry=registry,
        )
        self.engine_errors = Counter(
            "expbuild_worker_engine_errors",
            "Actions that ended INTERNAL: a fault of the worker, not of the action.",
            ["executor"],
            registry=registry,
        )

    def observe(self, result: ActionResult, *, ended: float) -> None:
        executor = result.executor
        self.actions.labels(executor, result.status.value).inc()
        for stage, seconds in stage_durations(result.times, ended=ended).items():
            if seconds is not None:
                self.stage_seconds.labels(executor, stage).observe(seconds)
        self.log_bytes.labels(executor, "stdout").inc(result.stdout.size_bytes)
        self.log_bytes.labels(executor, "stderr").inc(result.stderr.size_bytes)
        self.output_bytes.labels(executor).inc(sum(f.digest.size for f in result.outputs.files))
        if result.status is ExecutionStatus.INTERNAL:
            self.engine_errors.labels(executor).inc()


class MetricsRunner(RunnerDecorator):
    """Counts each finished action from its result alone (status, stage times, bytes), the way
    Buildbarn's metrics executor reads its execution metadata: nothing in the engine counts.
    Wraps ``TimestampingRunner`` so the stage times are there."""

    def __init__(self, inner: ActionRunner, *, metrics: ActionMetrics) -> None:
        super().__init__(inner)
        self._metrics = metrics

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        async for event in self._inner.run(execution):
            if isinstance(event, ActionResult):
                self._metrics.observe(event, ended=time.time())
            yield event


class EngineCollector(Collector):
    """What the engine holds right now, read at scrape time: running actions per executor, queued
    actions, and refusals at admission by reason (the WorkerError type).

    Runs on the metrics server's thread: it only reads integers and copies one small dict, which
    the event loop's writes cannot leave half-done."""

    def __init__(self, engine: ExecutionEngine, executors: Sequence[str]) -> None:
        self._engine = engine
        self._executors = tuple(executors)

    def collect(self) -> Iterator[Metric]:
        admission = self._engine.admission
        running = GaugeMetricFamily(
            "expbuild_worker_actions_running", "Actions holding a slot, by executor.", labels=["executor"]
        )
        for name in self._executors:
            running.add_metric([name], admission.running_for(name))
        yield running
        queued = admission.queued
        yield GaugeMetricFamily(
            "expbuild_worker_actions_queued", "Actions admitted and waiting for a slot.", value=queued
        )
        refusals = CounterMetricFamily(
            "expbuild_worker_refusals",
            "Actions refused at admission, by reason (the error type: ResourceExhaustedError for a "
            "full worker, MissingBlobsError, InvalidRequestError, UnavailableError while shutting down…).",
            labels=["reason"],
        )
        for reason, count in sorted(dict(self._engine.refusals).items()):
            refusals.add_metric([reason], count)
        yield refusals
