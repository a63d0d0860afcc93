"""The action log: one line per finished action, from a decorator over the action runner."""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextvars import ContextVar

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._runner import RunnerDecorator
from expbuild_worker.engine._timestamps import stage_durations
from expbuild_worker.model import ActionEvent, ActionResult, StageTimes

_log = logging.getLogger("expbuild_worker.actions")

CALLER: ContextVar[str] = ContextVar("expbuild_worker_caller", default="")
"""Who asked for the work being done: the name of the token a front door's call presented."""


class ActionLogRunner(RunnerDecorator):
    """Logs each finished action at info level on the ``expbuild_worker.actions`` logger: its
    execution id, caller, executor, image, status, exit code or signal, stage durations and
    bytes. Reads the result alone (the stage times are stamped by ``TimestampingRunner``,
    which this wraps)."""

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        async for event in self._inner.run(execution):
            if isinstance(event, ActionResult) and _log.isEnabledFor(logging.INFO):
                _log.info("%s", _line(execution, event))
            yield event


def _line(execution: Execution, result: ActionResult) -> str:
    ending = (
        f"exit {result.exit_code}"
        if result.exit_code is not None
        else (f"signal {result.signal}" if result.signal is not None else "no exit")
    )
    outputs = result.outputs.files
    parts = [
        f"action {result.execution_id} finished: {result.status.value}, {ending}",
        f"caller={execution.caller or '-'}",
        f"executor={result.executor}",
        f"image={execution.action.image or '-'}",
        _durations(result.times),
        f"stdout={result.stdout.size_bytes}B stderr={result.stderr.size_bytes}B",
        f"outputs={len(outputs)} files {sum(f.digest.size for f in outputs)}B",
    ]
    return " ".join(parts)


def _durations(t: StageTimes) -> str:
    spans = stage_durations(t)
    return " ".join(f"{label}={_ms(spans[stage])}" for label, stage in _LABELS)


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:.1f}ms" if seconds is not None else "-"


_LABELS = (
    ("queued", "queued"),
    ("staging", "input_staging"),
    ("running", "execution"),
    ("collecting", "output_collection"),
)
"""The action log's name for each stage (kept: log searches already use them)."""
