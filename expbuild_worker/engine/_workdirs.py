"""Private action directories: created ahead of need, removed after the result is on its way."""

from __future__ import annotations

import asyncio
import logging
import os
import uuid
from pathlib import Path

from expbuild_worker.fs import remove_tree

_log = logging.getLogger(__name__)


SPARE_DIRECTORIES = 4
"""Fresh action directories kept made ahead of need."""


class ActionDirectories:
    """Hands out fresh, empty, never-used directories under ``root`` and removes them afterwards.

    Creating and removing a directory costs ~0.1 ms each on an ordinary disk, a large share of
    a fast action's overhead, so both happen off the action's path: a few directories are
    made ahead, and a finished action's directory is removed in the background (tracked, so
    ``close`` waits for it). A directory is never reused: a process that escaped its action
    could still write into the old one.
    """

    def __init__(self, *, root: Path, spare: int = SPARE_DIRECTORIES) -> None:
        self.root = root
        self._spare_target = spare
        self._spares: list[Path] = []
        self._removals: set[asyncio.Task[None]] = set()
        self._refill_scheduled = False

    async def start(self) -> None:
        """Remove whatever a previous run left behind and make the first spares."""
        if not await asyncio.to_thread(remove_tree, self.root):
            _log.warning("could not remove everything a previous run left under %s", self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._refill()

    def acquire(self) -> Path:
        path = self._spares.pop() if self._spares else self._make()
        if not self._refill_scheduled:
            self._refill_scheduled = True
            asyncio.get_running_loop().call_soon(self._refill)
        return path

    def release(self, path: Path) -> None:
        """Remove ``path`` and everything in it, soon, in the background."""
        task = asyncio.get_running_loop().create_task(_remove(path))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)

    async def close(self) -> None:
        """Wait for pending removals and remove the spares."""
        if self._removals:
            await asyncio.gather(*self._removals, return_exceptions=True)
        for path in self._spares:
            await _remove(path)
        self._spares.clear()

    def _make(self) -> Path:
        path = self.root / uuid.uuid4().hex
        os.mkdir(path, 0o755)
        return path

    def _refill(self) -> None:
        self._refill_scheduled = False
        try:
            while len(self._spares) < self._spare_target:
                self._spares.append(self._make())
        except OSError as err:  # a full disk shows up when an action needs its directory
            _log.warning("cannot prepare action directories under %s: %s", self.root, err)


async def _remove(path: Path) -> None:
    """An empty directory (the common case) goes without a thread hop."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError:
        if not await asyncio.to_thread(remove_tree, path):
            _log.warning("could not remove everything in action directory %s", path)
