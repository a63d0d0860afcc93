"""The container pool on a real engine: fresh containers per action, recycled ones proven clean."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _dockerkit import (
    ENTRIES,
    ENV,
    TEST_LIMITS,
    docker_executor,
    idle_processes,
    labelled_containers,
    new_worker_id,
    pooled,
    remove_labelled,
)
from _support import wait_until
from test_worker_crash import WorkerProcess

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.config import DockerPoolConfig, LimitsConfig
from expbuild_worker.execution.docker import DockerExecutor
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.model import ExecutionStatus, LogChunk, LogStream, ResourceLimits, RunOutcome, Started

pytestmark = pytest.mark.docker

MiB = 1 << 20
LABEL_POOL = "io.expbuild.pool"
SMALL = ResourceLimits(cpu_cores=1.0, memory_bytes=64 * MiB, max_processes=64)


@pytest.fixture(params=ENTRIES)
def entry(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def run(
    ex: DockerExecutor,
    root: Path,
    script: str,
    *,
    recycle: bool = False,
    env: dict[str, str] | None = None,
    limits: ResourceLimits = TEST_LIMITS,
    stop_after: float | None = None,
) -> tuple[RunOutcome, str]:
    """Run ``sh -c script``; the outcome and stdout."""
    root.mkdir(parents=True, exist_ok=True)
    command = Command(
        execution_id=uuid.uuid4().hex,
        argv=["sh", "-c", script],
        environment=env or ENV,
        root=root,
        working_directory="",
        stdin=b"",
        limits=limits,
        recycle_runner=recycle,  # as the engine passes an own-API or REAPI request's choice
    )
    stop = StopSignal()
    out = bytearray()
    outcome: RunOutcome | None = None
    async for event in ex.execute(command, stop):
        if isinstance(event, Started) and stop_after is not None:
            asyncio.get_running_loop().call_later(stop_after, stop.request, ExecutionStatus.TIMED_OUT)
        elif isinstance(event, LogChunk) and event.stream is LogStream.STDOUT:
            out += event.data
        elif isinstance(event, RunOutcome):
            outcome = event
    assert outcome is not None
    return outcome, out.decode()


async def settle(ex: DockerExecutor, limits: ResourceLimits = TEST_LIMITS) -> None:
    """Let the pool refill (recycled containers are given back once cleaned, after the outcome)."""
    await asyncio.sleep(0.3)
    await ex.warmup([])


def test_a_pool_container_s_idle_processes_do_not_count_against_the_limit(
    busybox_image: str, tmp_path: Path, entry: str
) -> None:
    """In fresh and recycled pool containers the command gets exactly its max_processes (3: the
    shell and two background sleeps), as in a cold container."""
    limits = ResourceLimits(cpu_cores=1.0, memory_bytes=64 * MiB, max_processes=3)
    script = "sleep 0.5; for i in 1 2 3 4; do sleep 2 & echo started $i; done; wait"

    async def main() -> list[tuple[RunOutcome, str]]:
        async with pooled(busybox_image, entry) as ex:
            await ex.warmup([])
            results = []
            for i, recycle in enumerate((False, True, True)):
                results.append(await run(ex, tmp_path / str(i), script, recycle=recycle, limits=limits))
                await settle(ex)
            return results

    for outcome, out in asyncio.run(main()):
        assert outcome.status is ExecutionStatus.COMPLETED, outcome
        assert out == "started 1\nstarted 2\n", out


def test_recycled_container_shows_no_trace_of_the_previous_action(
    busybox_image: str, tmp_path: Path, entry: str
) -> None:
    """The next action in a recycled container sees none of the last one's files, /tmp, env or processes."""
    dirty = "echo secret > /tmp/s; mkdir /tmp/d; echo x > /dev/shm/m; echo o > left; hostname"
    look = "hostname; ls -A /tmp /dev/shm; ls -A .; env | grep -c SECRET; echo $$; ps -o pid,stat,args"

    async def main() -> tuple[str, str]:
        async with pooled(busybox_image, entry) as ex:
            await ex.warmup([])
            first, out1 = await run(ex, tmp_path / "a", dirty, recycle=True, env={**ENV, "SECRET": "1"})
            assert first.status is ExecutionStatus.COMPLETED, first
            await settle(ex)
            second, out2 = await run(ex, tmp_path / "b", look, recycle=True)
            assert second.status is ExecutionStatus.COMPLETED, second
            return out1, out2

    out1, out2 = asyncio.run(main())
    head, listing = out2.split("PID", 1)
    lines = head.split("\n")
    assert lines[0] == out1.strip(), "the same container was reused"
    assert "secret" not in out2 and "left" not in out2 and "m\n" not in out2
    assert lines[-3] == "0", "no environment variable of the previous action"
    # The idle processes only: every process but this action's shell and its ps.
    shell = lines[-2].strip()
    others = [
        line
        for line in listing.splitlines()[1:]
        if line.split() and line.split()[0] != shell and line.split()[2:4] != ["ps", "-o"]
    ]
    assert len(others) == idle_processes(entry), out2


def test_background_process_left_behind_is_killed_before_reuse(
    busybox_image: str, tmp_path: Path, entry: str
) -> None:
    """A daemonised `sleep` of one action is gone before the next action enters the recycled container."""

    async def main() -> tuple[str, str]:
        async with pooled(busybox_image, entry) as ex:
            await ex.warmup([])
            first, out1 = await run(
                ex, tmp_path / "a", "hostname; setsid sleep 4242 </dev/null >/dev/null 2>&1 &", recycle=True
            )
            assert first.status is ExecutionStatus.COMPLETED
            await settle(ex)
            _, out2 = await run(ex, tmp_path / "b", "hostname; ps -o args", recycle=True)
            return out1, out2

    out1, out2 = asyncio.run(main())
    assert out2.split("\n")[0] == out1.strip(), "the same container was reused"
    assert "sleep 4242" not in out2


@pytest.mark.parametrize(
    "case",
    [
        ("dd if=/dev/zero of=/dev/null bs=300M count=1; exit 0", SMALL, None, ExecutionStatus.OOM_KILLED),
        ("sleep 600", TEST_LIMITS, 0.5, ExecutionStatus.TIMED_OUT),
    ],
    ids=["oom", "timeout"],
)
def test_oom_and_timeout_in_a_recycled_container_are_reported_and_it_is_replaced(
    busybox_image: str,
    tmp_path: Path,
    case: tuple[str, ResourceLimits, float | None, ExecutionStatus],
    entry: str,
) -> None:
    """OOMKilled stays false for an exec'd process, so counters tell; a failed container is not lent again."""
    script, limits, stop_after, status = case

    async def main() -> tuple[RunOutcome, str, str]:
        async with pooled(busybox_image, entry) as ex:
            _, before = await run(ex, tmp_path / "a", "hostname", recycle=True, limits=limits)
            await settle(ex)
            bad, _ = await run(
                ex, tmp_path / "b", f"hostname; {script}", recycle=True, limits=limits, stop_after=stop_after
            )
            await settle(ex)
            _, after = await run(ex, tmp_path / "c", "hostname", recycle=True, limits=limits)
            return bad, before, after

    bad, before, after = asyncio.run(main())
    assert bad.status is status, bad
    assert before != after, "the container that failed was replaced"


def test_concurrent_actions_never_share_a_container(busybox_image: str, tmp_path: Path, entry: str) -> None:
    """Four actions at once, fresh and recycled, each run in a container of its own."""

    async def main() -> list[str]:
        async with pooled(busybox_image, entry, min_idle=2) as ex:
            await ex.warmup([])
            results = await asyncio.gather(
                *(run(ex, tmp_path / str(i), "hostname; sleep 1", recycle=i % 2 == 0) for i in range(4))
            )
            return [out.strip() for _, out in results]

    hosts = asyncio.run(main())
    assert len(set(hosts)) == 4, hosts


def test_pool_container_killed_from_outside_is_noticed_and_replaced(
    busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """An idle container killed behind the worker's back is never lent; the action runs, the pool refills."""
    worker_id = new_worker_id()

    async def main() -> tuple[RunOutcome, list[dict[str, Any]]]:
        async with docker_executor(
            busybox_image,
            worker_id=worker_id,
            pool=DockerPoolConfig(enabled=True, min_idle=1, max_size=2),
            default_limits=LimitsConfig(cpu_cores=1.0, memory_bytes=256 * MiB, max_processes=256),
        ) as ex:
            await ex.warmup([])
            idle = labelled_containers(docker_client, worker_id)
            assert len(idle) == 1
            docker_client.api.kill(idle[0]["Id"])
            outcome, _ = await run(ex, tmp_path, "true")
            await asyncio.sleep(3)  # the pool's liveness check and refill
            return outcome, [
                c for c in labelled_containers(docker_client, worker_id) if c["Id"] != idle[0]["Id"]
            ]

    try:
        outcome, replaced = asyncio.run(main())
    finally:
        remove_labelled(docker_client, worker_id)
    assert outcome.status is ExecutionStatus.COMPLETED
    assert any(c["State"] == "running" for c in replaced), "a new idle container took the dead one's place"


@pytest.fixture
def pool_config(tmp_path: Path, busybox_image: str, docker_client: Any) -> Iterator[tuple[Path, str]]:
    """A Docker worker config with the pool on and a worker id of its own; its containers removed after."""
    worker_id = new_worker_id()
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""
[server]
address = "127.0.0.1"
worker_id = "{worker_id}"
shutdown_grace_seconds = 0.0

[execution]
work_root = "{tmp_path / "work"}"

[executor.docker]
type = "docker"
image = "{busybox_image}"
orphan_sweep_interval_seconds = 600

[executor.docker.pool]
enabled = true
min_idle = 2
max_size = 2
"""
    )
    yield config, worker_id
    remove_labelled(docker_client, worker_id)


def test_sigkill_of_the_worker_then_restart_leaves_no_pool_container(
    pool_config: tuple[Path, str], docker_client: Any
) -> None:
    """Pool containers of a SIGKILLed worker carry its labels: its restart (same id) removes them all."""
    config, worker_id = pool_config
    worker = WorkerProcess(config)
    try:
        with grpc.insecure_channel(worker.target) as channel:
            pb_grpc.WorkerServiceStub(channel).Warmup(pb.WarmupRequest(), timeout=60)
        assert wait_until(lambda: len(labelled_containers(docker_client, worker_id)) >= 2, 20)
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
    finally:
        worker.stop()
    stranded = {c["Id"] for c in labelled_containers(docker_client, worker_id)}
    assert len(stranded) >= 2, "SIGKILL gave no chance to clean up"

    restarted = WorkerProcess(config)
    try:
        assert wait_until(
            lambda: not stranded & {c["Id"] for c in labelled_containers(docker_client, worker_id)}, 10
        )
    finally:
        restarted.stop()
