"""Blocking calls of the REAPI handlers, run off the event loop and kept in order."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

_T = TypeVar("_T")


class Calls:
    """Runs one user's blocking calls (a handler's, an upload's) on ``pool``, one after another.

    A call starts only when the one before it has returned, even when the task that started
    that one was cancelled meanwhile (its thread cannot be stopped) and even when two tasks
    share this object (a resumed upload): two threads never use one writer at once. ``finish``
    runs a clean-up once the call in flight has returned. ``pool`` None is the event loop's
    default executor.
    """

    def __init__(self, pool: concurrent.futures.Executor | None) -> None:
        self._pool = pool
        self._last: asyncio.Future[Any] | None = None
        self._order = asyncio.Lock()

    async def run(self, fn: Callable[..., _T], *args: Any) -> _T:
        async with self._order:
            await self.settle()
            future = asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
            future.add_done_callback(_retrieve)
            self._last = future
        # Shielded: cancelling the caller must not mark the call done while its thread runs.
        return await asyncio.shield(future)

    async def settle(self) -> None:
        """Wait until the call in flight, if any, has returned (its outcome is its caller's)."""
        last = self._last
        if last is not None and not last.done():
            await asyncio.wait([last])

    def finish(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup`` (on the event loop) now, or as soon as the call in flight returns."""
        last = self._last
        if last is None or last.done():
            cleanup()
        else:
            last.add_done_callback(lambda _: cleanup())


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark an outcome seen: a caller cancelled meanwhile never awaits it, and that is no error."""
    if not future.cancelled():
        future.exception()
