"""What the worker can take on now, for schedulers: counts, free slots, readiness, and a change signal."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from expbuild_worker.model import Readiness


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutorStatus:
    """One executor's share of the worker: whether it can run an action now, and its slots."""

    name: str
    readiness: Readiness
    running: int
    """Actions of this executor holding a slot."""
    max_concurrency: int
    """Its own cap (``executor.NAME.max_concurrency``); 0 = only the worker-wide one applies."""
    free_slots: int
    """Actions it could start now without queueing: the worker-wide free slots, less where its
    own cap is nearer (0 when actions already wait, since they go first)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerStatus:
    """A snapshot of the engine: what runs, what waits, what is free, which executors are ready."""

    running: int
    queued: int
    max_running: int
    max_queued: int
    accepting: bool
    """False once shutdown began: every new action is refused."""
    executors: tuple[ExecutorStatus, ...]
    version: int
    """The change counter this snapshot was taken at (see ``StatusSignal``)."""

    @property
    def free_slots(self) -> int:
        return free_slots(max_running=self.max_running, running=self.running, queued=self.queued)

    @property
    def free_queue_places(self) -> int:
        return max(0, self.max_queued - self.queued)


def free_slots(*, max_running: int, running: int, queued: int) -> int:
    """Actions that would start at once rather than queue: none while others wait (they go first,
    unless their executor's own cap holds them back, which a snapshot does not show)."""
    return max(0, max_running - running) if not queued else 0


class StatusSignal:
    """A version counter the engine bumps when what a scheduler sees changes (an action admitted
    or finished, readiness changed, shutdown began); waiters wake at the next bump.

    A counter rather than a bare event: a watcher that was busy sending when several changes
    happened still sees that something changed, and sends one status for all of them.
    """

    def __init__(self) -> None:
        self.version = 0
        self._changed = asyncio.Event()

    def bump(self) -> None:
        self.version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait(self, seen: int, at_most_seconds: float | None = None) -> int:
        """The version once it differs from ``seen``, or after ``at_most_seconds``, whichever is first."""
        if self.version != seen:
            return self.version
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), at_most_seconds)
        return self.version
