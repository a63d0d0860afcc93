"""The janitor: removes containers and cgroups carrying this worker's id that no live action owns."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import Any

from expbuild_worker.errors import WorkerError
from expbuild_worker.execution.cgroups import ActionCgroups
from expbuild_worker.execution.docker._daemon import DockerDaemon, explain, status_of
from expbuild_worker.execution.docker._spec import LABEL_ACTION, LABEL_EXECUTOR, LABEL_WORKER

_log = logging.getLogger(__name__)


async def remove_container(daemon: DockerDaemon, container_id: str) -> None:
    """Kill and remove a container and its anonymous volumes; already gone is fine."""
    try:
        await daemon.call(lambda api: api.remove_container(container_id, force=True, v=True))
    except Exception as err:
        status = status_of(err)
        if status == 404:
            return
        if status == 409 and "already in progress" in explain(err):
            return
        raise


class Janitor:
    """Sweeps orphans: at start-up (a restarted worker finds what its predecessor left), then
    every ``interval`` seconds (0 = only when asked).

    An orphan is a container labelled with this worker's id and this executor's name whose
    action token is not live in this process (two Docker executors of one worker share the
    worker id; the name keeps each from sweeping the other's containers). Tokens are
    registered before their container is created and released only after it is removed, so a
    sweep never races an action it does not own.
    """

    def __init__(
        self,
        *,
        daemon: DockerDaemon,
        worker_id: str,
        executor: str,
        live_tokens: Callable[[], Collection[str]],
        cgroups: Callable[[], ActionCgroups | None],
        interval: float,
    ) -> None:
        self._daemon = daemon
        self._worker_id = worker_id
        self._executor = executor
        self._live = live_tokens
        self._cgroups = cgroups
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        """Remove every orphan now; returns how many containers were removed."""
        labels = [f"{LABEL_WORKER}={self._worker_id}", f"{LABEL_EXECUTOR}={self._executor}"]
        containers: list[dict[str, Any]] = await self._daemon.call(
            lambda api: api.containers(all=True, filters={"label": labels})
        )
        removed = 0
        for container in containers:
            token = (container.get("Labels") or {}).get(LABEL_ACTION, "")
            if token in self._live():
                continue
            await remove_container(self._daemon, container["Id"])
            removed += 1
        if removed:
            _log.info("removed %d orphaned container(s) of worker %s", removed, self._worker_id)
        cgroups = self._cgroups()
        if cgroups is not None:
            await self._daemon.offload(cgroups.sweep, set(self._live()))
        return removed

    def start_periodic(self) -> None:
        if self._interval > 0 and self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.sweep()
            except WorkerError as err:
                _log.warning("orphan sweep of worker %s failed: %s", self._worker_id, err)
            except Exception:
                _log.exception("orphan sweep of worker %s failed", self._worker_id)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
