"""`true` through every backend in one run: host, sandbox, Docker, Podman and gVisor, as ratios of the host.

Each executor is built as the worker builds it and driven directly (spawn or create, start,
stream, wait, usage, clean-up: everything of an action but staging and output collection,
which are the same for all). Rounds alternate between backends so that load on the shared
machine falls on all alike. A backend that is missing here is reported, not measured.

    .venv/bin/python benchmarks/bench_backends.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from expbuild_worker.config import DockerExecutorConfig
from expbuild_worker.execution.executor import Command, Executor, StopSignal
from expbuild_worker.execution.host import HostExecutor
from expbuild_worker.execution.sandbox import SandboxExecutor
from expbuild_worker.model import ExecutionStatus, ResourceLimits, RunOutcome

IMAGE = "expbuild-test/busybox:1"
USER = (65534, 65534) if os.geteuid() == 0 else None
LIMITS = ResourceLimits(memory_bytes=256 << 20, max_processes=256)


def _process_executor(kind: str) -> Executor:
    common = {
        "kill_grace_seconds": 1.0,
        "refuse_unenforceable_limits": False,
        "default_limits": ResourceLimits(),
        "max_limits": ResourceLimits(),
        "worker_id": f"bench-{uuid.uuid4().hex[:8]}",
        "run_as": USER,
    }
    if kind == "host":
        return HostExecutor(name="host", **common)  # type: ignore[arg-type]
    return SandboxExecutor(name="sandbox", **common)  # type: ignore[arg-type]


def _docker_executor(name: str, **settings: object) -> Executor:
    from expbuild_worker.execution.docker import build_docker_executor

    config = DockerExecutorConfig(image=IMAGE, orphan_sweep_interval_seconds=0.0, **settings)  # type: ignore[arg-type]
    return build_docker_executor(name=name, config=config, worker_id=f"bench-{uuid.uuid4().hex[:8]}")


def _podman_ulimits() -> dict[str, int]:
    def within(kind: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)

    return {"ulimits_nofile": within(resource.RLIMIT_NOFILE), "ulimits_nproc": within(resource.RLIMIT_NPROC)}


@contextlib.contextmanager
def _podman_service(directory: Path) -> object:
    """`podman system service` on a socket of its own for this run; stopped (by its pid) at the end."""
    address = f"unix://{directory}/podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / "podman.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        yield address
    finally:
        service.terminate()
        service.wait(10)


async def _run_true(executor: Executor, root: Path) -> float:
    os.mkdir(root)
    command = Command(
        execution_id=uuid.uuid4().hex,
        argv=["true"],
        environment={"PATH": "/usr/bin:/bin"},
        root=root,
        working_directory="",
        stdin=b"",
        limits=LIMITS,
    )
    began = time.perf_counter()
    outcome = None
    async with contextlib.aclosing(executor.execute(command, StopSignal())) as events:
        async for event in events:
            if isinstance(event, RunOutcome):
                outcome = event
    elapsed = time.perf_counter() - began
    if outcome is None or outcome.status is not ExecutionStatus.COMPLETED or outcome.exit_code != 0:
        raise RuntimeError(f"{executor.name}: `true` did not complete: {outcome}")
    return elapsed


async def _ready(name: str, executor: Executor, work: Path) -> str:
    """'' when ``executor`` runs `true` here, else why not."""
    try:
        start = getattr(executor, "start", None)
        if start is not None:
            await start()
        ready = await executor.readiness()
        if not ready.ready:
            return ready.message
        await _run_true(executor, work / f"warm-{name}")
    except Exception as err:
        return str(err)
    return ""


async def main(rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        os.chmod(tmp, 0o755)  # the commands' user must reach its action directories, as under a work root
        candidates: dict[str, Executor] = {
            "host": _process_executor("host"),
            "sandbox": _process_executor("sandbox"),
        }
        skipped: dict[str, str] = {}
        try:
            candidates["docker"] = _docker_executor("docker")
            candidates["gvisor"] = _docker_executor("gvisor", runtime="runsc")
            if shutil.which("podman"):
                (work / "podman").mkdir()
                address = stack.enter_context(_podman_service(work / "podman"))  # type: ignore[arg-type]
                candidates["podman"] = _docker_executor("podman", docker_host=address, **_podman_ulimits())
            else:
                skipped["podman"] = "podman is not installed"
        except Exception as err:  # no Docker SDK or engine
            skipped["docker"] = str(err)
        executors: dict[str, Executor] = {}
        for name, ex in candidates.items():
            why = await _ready(name, ex, work)
            if why:
                skipped[name] = why
                await ex.close()
            else:
                executors[name] = ex
        times: dict[str, list[float]] = {name: [] for name in executors}
        try:
            for i in range(rounds):
                for name, ex in executors.items():
                    times[name].append(await _run_true(ex, work / f"{name}-{i}"))
        finally:
            for ex in executors.values():
                await ex.close()
    print(f"`true` end to end through each executor, {rounds} rounds alternating, {os.cpu_count()} cores")
    host = statistics.median(times["host"])
    print(f"{'backend':<10} {'median ms':>10} {'p90 ms':>10} {'ratio to host':>14}")
    for name, values in times.items():
        values.sort()
        median = statistics.median(values)
        p90 = values[int(0.9 * (len(values) - 1))]
        print(f"{name:<10} {median * 1e3:>10.2f} {p90 * 1e3:>10.2f} {median / host:>14.1f}")
    for name, why in skipped.items():
        print(f"{name:<10} not measured: {why}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    asyncio.run(main(parser.parse_args().rounds))
    sys.exit(0)
