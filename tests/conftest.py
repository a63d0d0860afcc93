"""Shared fixtures: a real worker on 127.0.0.1 port 0 in a background thread, and channels to it."""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # as the expbuild-worker command does, before grpc is imported

import grpc  # noqa: E402
import pytest  # noqa: E402

from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402
from expbuild_worker.config import parse_config  # noqa: E402
from expbuild_worker.server import RunningServer, start_server  # noqa: E402


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class WorkerThread:
    """A worker served by its own event loop on a daemon thread, so tests can stay synchronous."""

    def __init__(self, raw_config: dict[str, Any]) -> None:
        self.config = parse_config(raw_config, source="<test>")
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-worker", daemon=True)
        self._thread.start()
        self._channels: list[grpc.Channel] = []
        self._stopped = False
        try:
            self.server: RunningServer = self.call(start_server(self.config))
        except BaseException:
            self._stop_loop()
            raise

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return self.server.target

    def stub(self) -> pb_grpc.WorkerServiceStub:
        """A stub on a fresh channel to this worker, closed when the worker stops."""
        channel = grpc.insecure_channel(self.target)
        self._channels.append(channel)
        return pb_grpc.WorkerServiceStub(channel)

    def stop(self, grace: float = 0.0) -> None:
        """Stop the worker and its loop; safe to call again (a test may stop a worker itself)."""
        if self._stopped:
            return
        for channel in self._channels:
            channel.close()
        try:
            self.call(self.server.stop(grace))
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._stopped = True
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@pytest.fixture(autouse=True)
def _searchable_tmp_path(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A root worker runs host actions as an unprivileged user, who must be able to reach the
    action's directory by its full path; pytest makes its temporary directories private (0700).
    Let others search (not list) the test's tmp_path and the directories above it."""
    if "tmp_path" not in request.fixturenames:
        return
    path: Path = request.getfixturevalue("tmp_path")
    top = tmp_path_factory.getbasetemp().parent
    for directory in [path, *path.parents]:
        os.chmod(directory, os.stat(directory).st_mode | 0o011)
        if directory == top:
            break


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerThread]]:
    """Factory: start a worker whose config is the test defaults merged with ``overrides``."""
    started: list[WorkerThread] = []

    def factory(overrides: dict[str, Any] | None = None) -> WorkerThread:
        base = {
            # Each worker its own id: two live workers with one id on a host are refused.
            "server": {
                "address": "127.0.0.1",
                "port": 0,
                "shutdown_grace_seconds": 0.0,
                "worker_id": f"test-{uuid.uuid4().hex[:12]}",
            },
            "execution": {"work_root": str(tmp_path / f"work{len(started)}")},
            "executor": {"host": {"type": "host", "kill_grace_seconds": 0.5}},
        }
        worker = WorkerThread(_merge(base, overrides or {}))
        started.append(worker)
        return worker

    yield factory
    for worker in started:
        worker.stop()


@pytest.fixture
def worker(start_worker: Callable[..., WorkerThread]) -> WorkerThread:
    """A worker with the host executor and default settings."""
    return start_worker()


@pytest.fixture
def worker_target(worker: WorkerThread) -> str:
    return worker.target


@pytest.fixture
def channel(worker_target: str) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(worker_target) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.WorkerServiceStub:
    return pb_grpc.WorkerServiceStub(channel)
