"""StopSignal: the first reason wins, and callbacks hear it exactly once."""

from __future__ import annotations

import asyncio

from expbuild_worker.execution.executor import StopSignal
from expbuild_worker.model import ExecutionStatus


def test_first_reason_wins_and_callbacks_hear_it_once():
    """A timeout that fires after a cancellation must not relabel it CANCELLED -> TIMED_OUT."""

    async def scenario() -> None:
        stop = StopSignal()
        heard: list[ExecutionStatus] = []
        stop.on_request(heard.append)
        forgotten: list[ExecutionStatus] = []
        forget = stop.on_request(forgotten.append)
        forget()
        stop.request(ExecutionStatus.CANCELLED)
        stop.request(ExecutionStatus.TIMED_OUT)
        assert stop.reason is ExecutionStatus.CANCELLED
        assert await asyncio.wait_for(stop.wait(), 1) is ExecutionStatus.CANCELLED
        assert heard == [ExecutionStatus.CANCELLED] and forgotten == []

    asyncio.run(scenario())


def test_late_registration_is_called_at_once():
    """Registering after the request still delivers it, so no stop is ever missed."""
    stop = StopSignal()
    stop.request(ExecutionStatus.TIMED_OUT)
    heard: list[ExecutionStatus] = []
    stop.on_request(heard.append)()
    assert heard == [ExecutionStatus.TIMED_OUT]
