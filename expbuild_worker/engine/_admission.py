"""Concurrency slots and a bounded FIFO queue, worker-wide and per executor."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

from expbuild_worker.errors import ResourceExhaustedError


@dataclass(eq=False)
class Ticket:
    """One admitted action's place: first in the queue, then (once granted) a running slot."""

    executor: str
    queue_position: int
    granted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    running: bool = False


class Admission:
    """Admits at most ``max_running`` actions at once (and ``per_executor[name]`` for an executor),
    queues up to ``max_queued`` more in arrival order, and refuses the rest.

    Kept apart from the executor decorators on purpose: the slot must be held before inputs are
    staged, or a burst of queued actions would fill the disk with staged inputs.
    A waiter whose executor is full does not block waiters for other executors.
    """

    def __init__(self, *, max_running: int, max_queued: int, per_executor: Mapping[str, int]) -> None:
        self.max_running = max_running
        self.max_queued = max_queued
        self._per_executor = {k: v for k, v in per_executor.items() if v > 0}
        self._running: dict[str, int] = {}
        self._total_running = 0
        self._queue: list[Ticket] = []

    @property
    def running(self) -> int:
        return self._total_running

    @property
    def queued(self) -> int:
        return len(self._queue)

    def running_for(self, executor: str) -> int:
        """Slots held by actions of ``executor``."""
        return self._running.get(executor, 0)

    def cap_for(self, executor: str) -> int:
        """``executor``'s own concurrency cap; 0 = only ``max_running`` applies."""
        return self._per_executor.get(executor, 0)

    def reserve(self, executor: str) -> Ticket:
        """Grant a slot now, or queue; raise ResourceExhaustedError when the queue is full."""
        if self._can_run(executor) and not self._queue:
            ticket = Ticket(executor=executor, queue_position=0)
            self._grant(ticket)
            return ticket
        if len(self._queue) >= self.max_queued:
            raise ResourceExhaustedError(
                f"worker is full: {self._total_running} actions running and {len(self._queue)} queued "
                f"(max_concurrent_executions={self.max_running}, max_queued_executions={self.max_queued}); "
                "retry later"
            )
        ticket = Ticket(executor=executor, queue_position=len(self._queue) + 1)
        self._queue.append(ticket)
        self._dispatch()
        return ticket

    def release(self, ticket: Ticket) -> None:
        """Give back a running slot, or leave the queue; idempotent."""
        if ticket.running:
            ticket.running = False
            self._total_running -= 1
            self._running[ticket.executor] -= 1
        elif ticket in self._queue:
            self._queue.remove(ticket)
            if not ticket.granted.done():
                ticket.granted.cancel()
        self._dispatch()

    def _can_run(self, executor: str) -> bool:
        if self._total_running >= self.max_running:
            return False
        cap = self._per_executor.get(executor)
        return cap is None or self._running.get(executor, 0) < cap

    def _grant(self, ticket: Ticket) -> None:
        ticket.running = True
        self._total_running += 1
        self._running[ticket.executor] = self._running.get(ticket.executor, 0) + 1
        if not ticket.granted.done():
            ticket.granted.set_result(None)

    def _dispatch(self) -> None:
        for ticket in list(self._queue):
            if self._total_running >= self.max_running:
                return
            if self._can_run(ticket.executor):
                self._queue.remove(ticket)
                self._grant(ticket)
