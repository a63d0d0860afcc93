"""Docker executor overhead and log throughput, each beside the Docker CLI doing the same, in one run.

Prints, measured in this run on this machine:

1. ``docker run --rm`` of ``true`` through the Docker CLI, with the executor's hardening (init,
   read-only root, tmpfs /tmp, no capabilities, no new privileges, uid 65534, no network,
   CPU/memory/swap/PIDs limits, bind-mounted work directory, no log driver), median and p90;
2. the same action end to end through the worker (gRPC Execute, Docker executor), median and
   p90, and the ratio 2 / 1 (target <= 1.0);
3. for reference, the executor alone (no gRPC, no staging);
4. log streaming from a container: ``head -c N /dev/zero`` through Execute, against the CLI
   streaming the same into a pipe;
5. actions per second with several concurrent clients;
6. the container pool (``--pool-runs``, default 100; 0 skips): ``docker run --rm`` again as the
   baseline, the executor's cold path, an action entering a fresh pool container, an action in
   a recycled one (each entered through the in-container agent, and again by the engine's
   exec), and the docker SDK's own ``exec_run`` into a running hardened container, each median
   and p90 and as a ratio of ``docker run --rm``; then 8 concurrent actions per second, cold
   against pooled (fresh and recycled, agent and exec).

The two sides of each comparison run alternately in small batches, so load from elsewhere on a
shared machine falls on both alike. The test image is built locally (FROM scratch + the static
busybox); nothing is pulled. Everything binds 127.0.0.1 and is removed at the end. Exit status
is 0 whether or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import grpc
from _common import Timing, interleaved, mb_s, work_directory, worker_target

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.config import DockerExecutorConfig, DockerPoolConfig, LimitsConfig
from expbuild_worker.execution.docker import build_docker_executor
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.model import ExecutionStatus, ResourceLimits, RunOutcome

IMAGE = "expbuild-bench/busybox:1"
ENV = {"PATH": "/bin"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]
LIMITS = ResourceLimits(cpu_cores=1.0, memory_bytes=2 << 30, max_processes=1024)


def build_image(client: Any) -> None:
    """FROM scratch + the static busybox, built locally (never pulled)."""
    context = Path(tempfile.mkdtemp(prefix="expbuild-bench-image-"))
    try:
        shutil.copy2("/bin/busybox", context / "busybox")
        (context / "Dockerfile").write_text(
            'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        )
        client.images.build(path=str(context), tag=IMAGE, rm=True, forcerm=True, pull=False)
    finally:
        shutil.rmtree(context, ignore_errors=True)


def cli_argv(workdir: Path, argv: list[str]) -> list[str]:
    """``docker run --rm`` with the hardening and limits the executor applies by default."""
    return [
        "docker", "run", "--rm", "--init", "--read-only",
        "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=268435456",
        "--security-opt", "no-new-privileges", "--cap-drop", "ALL", "--user", "65534:65534",
        "--network", "none", "--ipc", "private", "--log-driver", "none",
        "--cpus", "1", "--memory", str(LIMITS.memory_bytes), "--memory-swap", str(LIMITS.memory_bytes),
        "--pids-limit", str(LIMITS.max_processes),
        "--mount", f"type=bind,source={workdir},target=/work", "--workdir", "/work",
        IMAGE, *argv,
    ]  # fmt: skip


async def cli_run(argv: list[str], *, sink: bool = False) -> int:
    """Run the CLI; with ``sink`` count the stdout bytes it streams. Returns bytes read."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE if sink else subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    received = 0
    if sink:
        assert proc.stdout is not None
        while chunk := await proc.stdout.read(1 << 16):
            received += len(chunk)
    if await proc.wait() != 0:
        raise RuntimeError(f"docker run failed: {argv[-3:]}")
    return received


async def execute(stub: pb_grpc.WorkerServiceAsyncStub, argv: list[str]) -> int:
    """One Execute through the worker; returns stdout bytes received."""
    request = pb.ExecuteRequest(argv=argv, environment=ENV, executor=pb.ExecutorSelector(name="docker"))
    received = 0
    result = None
    async for response in stub.Execute(request):
        kind = response.WhichOneof("event")
        if kind == "log":
            received += len(response.log.data)
        elif kind == "result":
            result = response.result
    if result is None or result.status != pb.EXECUTION_STATUS_COMPLETED or result.exit_code != 0:
        raise RuntimeError(f"benchmark action failed: {result}")
    return received


async def bench(args: argparse.Namespace) -> None:
    client = docker.from_env()
    version = client.version()
    print(
        f"expbuild-worker docker benchmark: engine {version.get('Version')}, worker {args.topology}, "
        f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, grpc {grpc.__version__}"
    )
    build_image(client)
    work = work_directory("expbuild-bench-docker-")
    cli_dir = work / "cli"
    cli_dir.mkdir()
    worker_id = f"bench-{uuid.uuid4().hex[:8]}"
    config_raw = {
        "server": {"address": "127.0.0.1", "port": 0, "log_level": "warning", "worker_id": worker_id},
        "execution": {
            "work_root": str(work / "worker"),
            "max_concurrent_executions": args.clients,
            "max_log_bytes_per_stream": max(args.stream_bytes, 1 << 20),
        },
        "executor": {"docker": {"type": "docker", "image": IMAGE, "pull_policy": "never"}},
    }
    try:
        async with worker_target(args.topology, config_raw, work) as target:
            await _measure(args, target, work, cli_dir, worker_id)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        client.close()


async def _measure(args: argparse.Namespace, target: str, work: Path, cli_dir: Path, worker_id: str) -> None:
    if args.pool_only:
        await _measure_pool(args, work, cli_dir, worker_id)
        return
    channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    executor = build_docker_executor(
        name="docker",
        config=DockerExecutorConfig(image=IMAGE, pull_policy="never"),
        worker_id=worker_id + "-x",
    )
    await executor.start()
    try:
        stub = pb_grpc.WorkerServiceStub(channel)

        async def direct() -> None:
            root = Path(tempfile.mkdtemp(dir=work))
            command = Command(
                execution_id=uuid.uuid4().hex, argv=["true"], environment=ENV, root=root,
                working_directory="", stdin=b"", limits=LIMITS,
            )  # fmt: skip
            async for event in executor.execute(command, StopSignal()):
                if isinstance(event, RunOutcome) and event.status is not ExecutionStatus.COMPLETED:
                    raise RuntimeError(f"direct action failed: {event}")
            shutil.rmtree(root, ignore_errors=True)

        print(f"\nper-action overhead of `true` ({args.runs} runs each, interleaved in batches of 5):")
        timings = await interleaved(
            {
                "cli": lambda: cli_run(cli_argv(cli_dir, ["true"])),
                "worker": lambda: execute(stub, ["true"]),
                "direct": direct,
            },
            args.runs,
        )
        cli, e2e = timings["cli"], timings["worker"]
        print(cli.row("1. docker run --rm (CLI, same hardening)"))
        print(e2e.row("2. Execute through the worker (gRPC, Docker executor)"))
        print(timings["direct"].row("3. the Docker executor alone (reference)"))
        ratio, ratio90 = e2e.median / cli.median, e2e.p90 / cli.p90
        met = "met" if ratio <= 1.0 else "NOT met"
        print(f"  ratio 2 / 1: median {ratio:.3f}, p90 {ratio90:.3f}   (target <= 1.0: {met})")

        total = args.stream_bytes
        print(f"\nlog streaming, {total / (1 << 20):.0f} MiB of stdout from a container:")
        producer = ["head", "-c", str(total), "/dev/zero"]
        start = time.perf_counter()
        cli_n = await cli_run(cli_argv(cli_dir, producer), sink=True)
        cli_s = time.perf_counter() - start
        start = time.perf_counter()
        wk_n = await execute(stub, producer)
        wk_s = time.perf_counter() - start
        print(f"  docker run --rm into a pipe (CLI)                   {mb_s(cli_s, cli_n)}")
        print(f"  Execute through the worker                          {mb_s(wk_s, wk_n)}")
        print(f"  ratio worker / CLI: {(wk_n / wk_s) / (cli_n / cli_s):.3f}")

        n = args.clients * args.per_client
        print(f"\nconcurrency: {n} `true` actions submitted at once, {args.clients} running at a time:")
        start = time.perf_counter()
        await asyncio.gather(*(execute(stub, ["true"]) for _ in range(n)))
        elapsed = time.perf_counter() - start
        print(f"  {n / elapsed:8.2f} actions/s ({n} actions in {elapsed:.2f} s)")
    finally:
        await executor.close()
        await channel.close()
    if args.pool_runs:
        await _measure_pool(args, work, cli_dir, worker_id)


async def _measure_pool(args: argparse.Namespace, work: Path, cli_dir: Path, worker_id: str) -> None:
    """Section 6: the pool's paths against ``docker run --rm`` and the SDK's exec, in this run."""
    limits = LimitsConfig(
        cpu_cores=LIMITS.cpu_cores or 0.0,
        memory_bytes=LIMITS.memory_bytes or 0,
        max_processes=LIMITS.max_processes or 0,
    )

    def make(suffix: str, pool: DockerPoolConfig) -> Any:
        return build_docker_executor(
            name="docker",
            config=DockerExecutorConfig(image=IMAGE, pull_policy="never", default_limits=limits, pool=pool),
            worker_id=f"{worker_id}-{suffix}",
            capacity=16,
        )

    cold = make("cold", DockerPoolConfig())
    pooled = make("pool", DockerPoolConfig(enabled=True, min_idle=1, max_size=12, agent="on"))
    pooled_exec = make("pool-exec", DockerPoolConfig(enabled=True, min_idle=1, max_size=12, agent="off"))
    api = docker.APIClient(version="auto")
    holder = api.create_container(
        IMAGE, entrypoint=["sleep"], command=["2147483647"], user="65534:65534", network_disabled=True,
        host_config=api.create_host_config(
            init=True, read_only=True, cap_drop=["ALL"], security_opt=["no-new-privileges"],
            network_mode="none", ipc_mode="private",
        ),
    )  # fmt: skip
    api.start(holder)
    running = docker.from_env().containers.get(holder["Id"])
    await cold.start()
    await pooled.start()
    await pooled_exec.start()

    async def run(executor: Any, *, recycle: bool = False) -> None:
        root = Path(tempfile.mkdtemp(dir=work))
        command = Command(
            execution_id=uuid.uuid4().hex, argv=["true"], environment=ENV, root=root,
            working_directory="", stdin=b"", limits=LIMITS,
            platform_properties={"recycle-runner": "true"} if recycle else {},
        )  # fmt: skip
        async for event in executor.execute(command, StopSignal()):
            if isinstance(event, RunOutcome) and event.status is not ExecutionStatus.COMPLETED:
                raise RuntimeError(f"pool benchmark action failed: {event}")
        shutil.rmtree(root, ignore_errors=True)

    async def timed(probe: Any, runs: int, before: Any = None) -> Timing:
        samples = []
        for _ in range(runs):
            if before is not None:
                await before()  # not timed: a fresh container is ready, as it is when the pool keeps up
            start = time.perf_counter()
            await probe()
            samples.append(time.perf_counter() - start)
        return Timing(samples)

    def ready(executor: Any) -> Any:
        async def filled() -> None:
            await asyncio.sleep(0.02)  # the previous container's removal and the refill start
            await executor.warmup([])

        return filled

    async def settle() -> None:
        await asyncio.sleep(0.02)  # a recycled container's clean-up runs after the outcome

    loop = asyncio.get_running_loop()

    def sdk_exec() -> Any:
        return loop.run_in_executor(None, lambda: running.exec_run(["true"], user="65534:65534"))

    try:
        runs = args.pool_runs
        print(f"\ncontainer pool, `true` ({runs} runs each, alternating in batches of 20):")
        for executor in (pooled, pooled_exec):
            await run(executor, recycle=True)  # one recycled container exists from here on
        probes: dict[str, tuple[Any, Any]] = {  # name: (probe, untimed step before each run)
            "cli": (lambda: cli_run(cli_argv(cli_dir, ["true"])), settle),
            "cold": (lambda: run(cold), settle),
            "fresh": (lambda: run(pooled), ready(pooled)),
            "recycled": (lambda: run(pooled, recycle=True), settle),
            "fresh_exec": (lambda: run(pooled_exec), ready(pooled_exec)),
            "recycled_exec": (lambda: run(pooled_exec, recycle=True), settle),
            "exec_run": (sdk_exec, settle),
        }
        timings: dict[str, list[float]] = {name: [] for name in probes}
        for _ in range(2):  # warm-up
            for probe, before in probes.values():
                await before()
                await probe()
        while len(timings["cli"]) < runs:
            for name, (probe, before) in probes.items():
                batch = min(20, runs - len(timings[name]))
                got = await timed(probe, batch, before)
                timings[name] += got.samples
        results = {name: Timing(samples) for name, samples in timings.items()}
        base = results["cli"]
        labels = {
            "cli": "docker run --rm (CLI, same hardening)",
            "cold": "cold path (executor, pool off)",
            "fresh": "fresh from the pool, agent (executor)",
            "recycled": "recycled pool container, agent (executor)",
            "fresh_exec": "fresh from the pool, engine exec (executor)",
            "recycled_exec": "recycled pool container, engine exec",
            "exec_run": "docker SDK exec_run into a running container",
        }
        for name, label in labels.items():
            t = results[name]
            print(f"{t.row(label)}   ratio {t.median / base.median:.3f} (p90 {t.p90 / base.p90:.3f})")
        print("  targets: fresh <= 0.35, recycled <= 0.15 of docker run --rm")

        n, width = args.pool_actions, 8
        print(f"\nthroughput: {n} `true` actions, {width} at a time:")
        for label, executor, recycle in (
            ("cold", cold, False),
            ("pooled, fresh", pooled, False),
            ("pooled, recycled", pooled, True),
            ("pooled, fresh, exec", pooled_exec, False),
            ("pooled, recycled, exec", pooled_exec, True),
        ):
            gate = asyncio.Semaphore(width)

            async def one(executor: Any = executor, recycle: bool = recycle, gate: Any = gate) -> None:
                async with gate:
                    await run(executor, recycle=recycle)

            start = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            elapsed = time.perf_counter() - start
            print(f"  {label:<22} {n / elapsed:8.2f} actions/s ({n} in {elapsed:.2f} s)")
    finally:
        await cold.close()
        await pooled.close()
        await pooled_exec.close()
        api.remove_container(holder, force=True)
        running.client.close()
        api.close()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topology", choices=["subprocess", "inprocess"], default="subprocess")
    parser.add_argument("--runs", type=int, default=40, help="samples per latency measurement")
    parser.add_argument("--stream-bytes", type=int, default=256 << 20, help="stdout bytes streamed")
    parser.add_argument("--clients", type=int, default=4, help="actions the worker runs at once")
    parser.add_argument("--per-client", type=int, default=10, help="actions submitted per running slot")
    parser.add_argument("--pool-runs", type=int, default=100, help="samples per pool path (0 = skip)")
    parser.add_argument("--pool-only", action="store_true", help="measure only the container pool")
    parser.add_argument("--pool-actions", type=int, default=48, help="actions in the pool throughput test")
    args = parser.parse_args()
    try:
        docker.from_env().ping()
    except Exception as err:
        print(
            f"bench_docker: no Docker engine answers ({err}); run scripts/ensure-docker.sh", file=sys.stderr
        )
        return 0
    if shutil.which("docker") is None:
        print("bench_docker: the docker CLI is missing; it is the baseline", file=sys.stderr)
        return 0
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
