"""Helpers for driving the Docker executor directly: build one, run a command, look for leftovers."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _support import wait_until

from expbuild_worker.config import DockerExecutorConfig, DockerPoolConfig, LimitsConfig
from expbuild_worker.execution.docker import DockerExecutor, build_docker_executor
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorEvent,
    LogChunk,
    LogStream,
    ResourceLimits,
    RunOutcome,
    Started,
)

LABEL_WORKER = "io.expbuild.worker-id"
TEST_LIMITS = ResourceLimits(cpu_cores=1.0, memory_bytes=256 << 20, max_processes=256)
TEST_LIMITS_CONFIG = LimitsConfig(
    cpu_cores=TEST_LIMITS.cpu_cores or 0.0,
    memory_bytes=TEST_LIMITS.memory_bytes or 0,
    max_processes=TEST_LIMITS.max_processes or 0,
)
"""TEST_LIMITS as an executor's ``default_limits``: the shape a pool fills ahead of need."""
ENV = {"PATH": "/bin"}


def new_worker_id() -> str:
    """A worker id of its own per test, so no test's janitor ever touches another test's containers."""
    return f"test-{uuid.uuid4().hex[:12]}"


@contextlib.asynccontextmanager
async def docker_executor(
    image: str, *, worker_id: str | None = None, **settings: Any
) -> AsyncIterator[DockerExecutor]:
    """A started executor for ``image`` with config ``settings``, closed afterwards."""
    config = DockerExecutorConfig(image=image, **{"orphan_sweep_interval_seconds": 0.0, **settings})
    executor = build_docker_executor(name="docker", config=config, worker_id=worker_id or new_worker_id())
    await executor.start()
    try:
        yield executor
    finally:
        await executor.close()


ENTRIES = ["agent", "exec"]
"""How an action enters a pool container: through the in-container agent, or the engine's exec."""


def idle_processes(entry: str) -> int:
    """Processes a pool container holds between actions: the agent, or the init and the idle command."""
    return 1 if entry == "agent" else 2


def pooled(image: str, entry: str = "agent", *, kill_grace_seconds: float = 1.0, **pool: Any) -> Any:
    """An executor whose pool keeps containers of the test limits ready, entered the ``entry`` way
    (``on``, not ``auto``: a missing agent binary fails the test instead of testing exec twice)."""
    return docker_executor(
        image,
        kill_grace_seconds=kill_grace_seconds,
        pool=DockerPoolConfig(
            enabled=True,
            **{"min_idle": 1, "max_size": 4, "agent": "on" if entry == "agent" else "off", **pool},
        ),
        default_limits=TEST_LIMITS_CONFIG,
    )


@dataclass
class Ran:
    """What one command produced, as a consumer of the executor sees it."""

    outcome: RunOutcome
    stdout: bytes
    stderr: bytes
    events: list[ExecutorEvent] = field(default_factory=list)
    elapsed: float = 0.0

    @property
    def status(self) -> ExecutionStatus:
        return self.outcome.status


async def run_command(
    executor: DockerExecutor,
    root: Path,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] = ENV,
    workdir: str = "",
    stdin: bytes = b"",
    limits: ResourceLimits = TEST_LIMITS,
    outputs: Sequence[str] = (),
    image: str | None = None,
    stop_after: float | None = None,
    stop_reason: ExecutionStatus = ExecutionStatus.TIMED_OUT,
    execution_id: str | None = None,
    recycle: bool = False,
) -> Ran:
    """Run ``argv`` with ``root`` as its action directory; ``stop_after`` seconds after Started,
    ask it to stop with ``stop_reason`` (what the deadline decorator and cancellation do)."""
    root.mkdir(parents=True, exist_ok=True)
    command = Command(
        execution_id=execution_id or uuid.uuid4().hex,
        argv=list(argv),
        environment=dict(env),
        root=root,
        working_directory=workdir,
        stdin=stdin,
        limits=limits,
        output_paths=list(outputs),
        image=image,
        recycle_runner=recycle,
    )
    stop = StopSignal()
    streams = {LogStream.STDOUT: bytearray(), LogStream.STDERR: bytearray()}
    events: list[ExecutorEvent] = []
    outcome: RunOutcome | None = None
    timer: asyncio.TimerHandle | None = None
    began = time.monotonic()
    try:
        async for event in executor.execute(command, stop):
            events.append(event)
            if isinstance(event, Started) and stop_after is not None:
                timer = asyncio.get_running_loop().call_later(stop_after, stop.request, stop_reason)
            elif isinstance(event, LogChunk):
                buf = streams[event.stream]
                assert event.offset == len(buf), "log chunks of a stream must be contiguous"
                assert 0 < len(event.data) <= 64 * 1024 + 8, "chunks are batched up to about 64 KiB"
                buf += event.data
            elif isinstance(event, RunOutcome):
                assert outcome is None, "exactly one outcome"
                outcome = event
    finally:
        if timer is not None:
            timer.cancel()
    assert outcome is not None, "the stream ended without an outcome"
    assert events[-1] is outcome, "the outcome comes last"
    return Ran(
        outcome=outcome,
        stdout=bytes(streams[LogStream.STDOUT]),
        stderr=bytes(streams[LogStream.STDERR]),
        events=events,
        elapsed=time.monotonic() - began,
    )


def labelled_containers(client: Any, worker_id: str) -> list[dict[str, Any]]:
    """Every container, running or not, labelled with ``worker_id`` (the daemon's list entries)."""
    found: list[dict[str, Any]] = client.api.containers(
        all=True, filters={"label": f"{LABEL_WORKER}={worker_id}"}
    )
    return found


def gone_within(client: Any, worker_id: str, seconds: float = 5.0) -> bool:
    """True once no container labelled ``worker_id`` exists, polling up to ``seconds``."""
    return wait_until(lambda: not labelled_containers(client, worker_id), seconds, 0.1)


def remove_labelled(client: Any, worker_id: str) -> None:
    """Test cleanup: never leave a container behind, even when a test failed."""
    for container in labelled_containers(client, worker_id):
        with contextlib.suppress(Exception):
            client.api.remove_container(container["Id"], force=True, v=True)
