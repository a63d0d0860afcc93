"""`true` end to end through host, sandbox, Docker, Podman and gVisor in one run, as ratios of the host.

One worker process serves all five executors; each round sends the own API's Execute of `true`
to each executor by name, alternating, so load on the shared machine falls on all alike. What
is timed is what a client sees: the call from request to result (admission, staging, the
executor's whole life of the action, collection, the result). Between two actions the worker is
given SETTLE_SECONDS: a container's removal goes on after its result (by design), and without the
pause its engine's work would be charged to whichever action comes next. Each backend then runs a
batch of BATCH actions back to back, the first not counted. A backend that is missing
or not ready here is reported, not measured.

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
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # as the expbuild-worker command does, before grpc is imported

import grpc  # noqa: E402
from _common import work_directory, worker_target  # noqa: E402

from expbuild_worker.api.v1 import worker_pb2 as pb  # noqa: E402
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

IMAGE = "expbuild-test/busybox:1"
ENV = {"PATH": "/usr/bin:/bin"}
SETTLE_SECONDS = 0.3
BATCH = 4


def _podman_ulimits() -> dict[str, int]:
    def within(kind: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)

    return {"ulimits_nofile": within(resource.RLIMIT_NOFILE), "ulimits_nproc": within(resource.RLIMIT_NPROC)}


@contextlib.contextmanager
def _podman_service(directory: Path) -> Iterator[str]:
    """`podman system service` on a socket of its own for this run; stopped (by its pid) at the end."""
    address = f"unix://{directory}/podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", address],
        cwd=directory,  # conmon may drop an "oom" marker file in the service's working directory
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


def _executors(podman: str | None) -> dict[str, dict[str, Any]]:
    docker = {"type": "docker", "image": IMAGE, "orphan_sweep_interval_seconds": 0.0}
    executors: dict[str, dict[str, Any]] = {
        "host": {"type": "host"},
        "sandbox": {"type": "sandbox"},
        "docker": docker,
        "gvisor": {**docker, "runtime": "runsc"},
    }
    if podman is not None:
        executors["podman"] = {**docker, "docker_host": podman, **_podman_ulimits()}
    return executors


async def _run_true(stub: pb_grpc.WorkerServiceAsyncStub, executor: str) -> float:
    request = pb.ExecuteRequest(argv=["true"], environment=ENV, executor=pb.ExecutorSelector(name=executor))
    began = time.perf_counter()
    result = None
    async for response in stub.Execute(request):
        if response.WhichOneof("event") == "result":
            result = response.result
    elapsed = time.perf_counter() - began
    if result is None or result.status != pb.EXECUTION_STATUS_COMPLETED or result.exit_code != 0:
        raise RuntimeError(f"{executor}: `true` did not complete: {result}")
    return elapsed


async def main(rounds: int) -> None:
    work = work_directory("expbuild-bench-backends-")
    skipped: dict[str, str] = {}
    try:
        with contextlib.ExitStack() as stack:
            podman = None
            if shutil.which("podman"):
                (work / "podman").mkdir()
                podman = stack.enter_context(_podman_service(work / "podman"))
            else:
                skipped["podman"] = "podman is not installed"
            config = {
                "server": {
                    "address": "127.0.0.1",
                    "port": 0,
                    "log_level": "warning",
                    "shutdown_grace_seconds": 0.0,
                    "worker_id": f"bench-{uuid.uuid4().hex[:8]}",
                },
                "execution": {"work_root": str(work / "work"), "max_concurrent_executions": 2},
                "storage": {"path": str(work / "cas")},
                "executor": _executors(podman),
            }
            async with (
                worker_target("subprocess", config, work) as target,
                grpc.aio.insecure_channel(target) as channel,
            ):
                stub = pb_grpc.WorkerServiceStub(channel)
                caps = await stub.GetCapabilities(pb.GetCapabilitiesRequest())
                ready = []
                for ex in caps.executors:
                    if not ex.ready:
                        skipped[ex.name] = ex.readiness_message
                        continue
                    try:
                        await _run_true(stub, ex.name)  # warm-up, and proof it runs here
                        ready.append(ex.name)
                    except Exception as err:
                        skipped[ex.name] = str(err)
                times: dict[str, list[float]] = {name: [] for name in ready}
                for _ in range(rounds):
                    for name in ready:
                        # A batch per backend: the first action after the pause warms the path
                        # up (an idle worker's first action pays cold caches) and is not
                        # counted; the rest run back to back, as a busy worker's do.
                        await asyncio.sleep(SETTLE_SECONDS)
                        for i in range(BATCH):
                            elapsed = await _run_true(stub, name)
                            if i:
                                times[name].append(elapsed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"`true` end to end (own API Execute) through each executor, {rounds} rounds alternating, "
          f"{os.cpu_count()} cores")  # fmt: skip
    if "host" not in times:
        print("host not measured: no ratios")
        return
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
