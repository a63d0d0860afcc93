"""Admission: slots, a bounded FIFO queue, per-executor caps."""

from __future__ import annotations

import asyncio

import pytest

from expbuild_worker.engine import Admission
from expbuild_worker.errors import ResourceExhaustedError


def test_slots_queue_and_refusal():
    """Two run, one waits, the fourth is refused; releasing a slot admits the waiter."""

    async def scenario() -> None:
        adm = Admission(max_running=2, max_queued=1, per_executor={})
        a, b = adm.reserve("host"), adm.reserve("host")
        c = adm.reserve("host")
        assert a.running and b.running and not c.running and c.queue_position == 1
        with pytest.raises(ResourceExhaustedError, match="max_queued_executions=1"):
            adm.reserve("host")
        adm.release(a)
        await asyncio.wait_for(c.granted, 1)
        assert c.running and adm.running == 2 and adm.queued == 0

    asyncio.run(scenario())


def test_per_executor_cap_does_not_block_other_executors():
    """A full docker executor must not hold back host actions queued behind it."""

    async def scenario() -> None:
        adm = Admission(max_running=4, max_queued=4, per_executor={"docker": 1})
        d1 = adm.reserve("docker")
        d2 = adm.reserve("docker")
        h = adm.reserve("host")
        assert d1.running and not d2.running and h.running
        adm.release(d1)
        assert d2.running

    asyncio.run(scenario())


def test_leaving_the_queue_frees_its_place():
    """A cancelled waiter leaves the queue so others can enter."""

    async def scenario() -> None:
        adm = Admission(max_running=1, max_queued=1, per_executor={})
        adm.reserve("host")
        waiter = adm.reserve("host")
        adm.release(waiter)
        assert adm.queued == 0
        adm.reserve("host")

    asyncio.run(scenario())
