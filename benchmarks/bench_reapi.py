"""Remote Execution API costs, each beside its baseline measured in the same run.

Prints, measured in this run on this machine:

1. a cached ActionCache.GetActionResult round trip against a gRPC echo round trip (a trivial
   unary echo server built with a generic handler, same grpc aio stack, same topology);
2. an uncached REAPI Execute of /bin/true (Action, Command and input root already in the CAS;
   ``skip_cache_lookup``) against the own API's Execute of the same command, and the ratio
   (target <= 1.3);
3. a real Bazel building the genrule workspace of tests/bazel/ through the worker, cold (every
   action executes) and fully cached (every action is an action-cache hit), beside the same
   build done locally by Bazel in its own ``linux-sandbox`` (``processwrapper-sandbox`` where
   that cannot run), and the ratios (target remote <= 1.5 x local). Each round is
   ``bazel clean`` + ``bazel build`` timed from the client, on one Bazel server started before
   the first round; each round sets its own ``--action_env``/``--host_action_env`` value, so
   its cold builds really are cold, remote and local alike. Skipped, with a note, when no
   ``bazel`` is on PATH.

Topology: with ``--topology subprocess`` (default, as a worker is deployed) the worker and the
echo server each run in a child process; with ``--topology inprocess`` they share this process
and its event loop. Everything binds 127.0.0.1 on a free port and is stopped at the end; the
Bazel server is shut down at the end and would stop by itself when idle. Exit status is 0
whether or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # as the expbuild-worker command does, before grpc is imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "bazel"))

import grpc  # noqa: E402
from _bazelkit import ACTIONS, Bazel, BazelFailed, remote_flags  # noqa: E402
from _common import interleaved, work_directory, worker_target  # noqa: E402
from bench_host import CHANNEL_OPTIONS, ECHO_METHOD, ENV, baseline_target, run_action, true_request  # noqa: E402
from google.rpc import code_pb2  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb  # noqa: E402
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc  # noqa: E402
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402
from expbuild_worker.model import Digest  # noqa: E402


def _worker_config(work: Path) -> dict[str, Any]:
    return {
        "server": {
            "address": "127.0.0.1",
            "port": 0,
            "shutdown_grace_seconds": 0.0,
            "log_level": "warning",
            "worker_id": f"bench-reapi-{os.getpid()}",  # its own: another worker may run on this host
        },
        "execution": {"work_root": str(work / "work"), "max_concurrent_executions": 2},
        # Scraped after one more cold Bazel build: where the worker's share of the time goes.
        "metrics": {"enabled": True, "address": "127.0.0.1", "port": METRICS_PORT},
        "storage": {"path": str(work / "cas")},
        "executor": {"host": {"type": "host"}},
    }


@asynccontextmanager
async def reapi_worker(topology: str) -> AsyncIterator[str]:
    """A worker serving the own API and the REAPI (its default) on one port."""
    work = work_directory("expbuild-bench-reapi-")
    try:
        async with worker_target(topology, _worker_config(work), work) as target:
            yield target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- REAPI calls ----------------------------------------------------------------------------------


def _pb_digest(data: bytes) -> re_pb.Digest:
    digest = Digest.of_bytes(data)
    return re_pb.Digest(hash=digest.sha256, size_bytes=digest.size)


async def upload_true_action(cas: re_grpc.ContentAddressableStorageStub) -> re_pb.Digest:
    """Put /bin/true's Command, an empty input root and the Action into the CAS; the Action's digest."""
    command = re_pb.Command(
        arguments=["/bin/true"],
        environment_variables=[
            re_pb.Command.EnvironmentVariable(name=k, value=v) for k, v in sorted(ENV.items())
        ],
    ).SerializeToString(deterministic=True)
    root = re_pb.Directory().SerializeToString(deterministic=True)
    action = re_pb.Action(
        command_digest=_pb_digest(command), input_root_digest=_pb_digest(root)
    ).SerializeToString(deterministic=True)
    blobs = [command, root, action]
    response = await cas.BatchUpdateBlobs(
        re_pb.BatchUpdateBlobsRequest(
            requests=[re_pb.BatchUpdateBlobsRequest.Request(digest=_pb_digest(b), data=b) for b in blobs]
        )
    )
    if any(r.status.code != code_pb2.OK for r in response.responses):
        raise RuntimeError(f"uploading the benchmark action failed: {response}")
    return _pb_digest(action)


async def reapi_execute(execution: re_grpc.ExecutionStub, request: re_pb.ExecuteRequest) -> None:
    """Execute and read the Operations to the done one; its response must say exit 0."""
    done = None
    async for operation in execution.Execute(request):
        if operation.done:
            done = operation
    response = re_pb.ExecuteResponse()
    if done is None or not done.response.Unpack(response):
        raise RuntimeError("Execute ended without a done Operation")
    if response.status.code != code_pb2.OK or response.result.exit_code != 0:
        raise RuntimeError(f"benchmark action failed: {response}")


async def get_action_result(ac: re_grpc.ActionCacheStub, action: re_pb.Digest) -> None:
    await ac.GetActionResult(re_pb.GetActionResultRequest(action_digest=action))


# ---- Bazel -----------------------------------------------------------------------------------------


def _wall(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _local_strategy(bazel: Bazel) -> str:
    """linux-sandbox when it runs here, else processwrapper-sandbox (both Bazel's own)."""
    for strategy in ("linux-sandbox", "processwrapper-sandbox"):
        run = bazel("build", *_local_flags(strategy, "probe"), check=False)
        if run.returncode == 0 and run.processes().get(strategy) == ACTIONS:
            return strategy
    raise RuntimeError("neither linux-sandbox nor processwrapper-sandbox builds the workspace here")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


METRICS_PORT = _free_port()


def _scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the worker's metrics endpoint, by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def where_the_time_goes(bazel: Bazel, target: str) -> None:
    """One more cold build, with the worker's metrics read before and after: per RPC method the
    calls and the seconds the worker spent in them, per action stage the seconds; the rest of
    the wall time is Bazel's (digests, Merkle trees, its own scheduling) and the transport."""
    before = _scrape()
    bazel("clean")
    wall = _wall(lambda: bazel("build", *remote_flags(target, *_salted("where"))))
    after = _scrape()

    def delta(name: str) -> dict[tuple[tuple[str, str], ...], float]:
        return {
            labels: value - before.get((metric, labels), 0.0)
            for (metric, labels), value in after.items()
            if metric == name and value - before.get((metric, labels), 0.0) > 0
        }

    print(f"  where the time goes in one more cold build ({wall:.2f} s wall):")
    calls = delta("expbuild_worker_rpcs_total")
    seconds = delta("expbuild_worker_rpc_duration_seconds_sum")
    by_method: dict[str, list[float]] = {}
    for labels, count in calls.items():
        method = dict(labels)["method"]
        by_method.setdefault(method, [0.0, 0.0])[0] += count
    for labels, spent in seconds.items():
        by_method.setdefault(dict(labels)["method"], [0.0, 0.0])[1] += spent
    for method, (count, spent) in sorted(by_method.items(), key=lambda kv: -kv[1][1]):
        print(f"    {method:<60} {int(count):4d} calls {spent * 1000:8.1f} ms")
    stages = delta("expbuild_worker_action_stage_duration_seconds_sum")
    for labels, spent in sorted(stages.items()):
        print(f"    action stage {dict(labels).get('stage', '?'):<47} {spent * 1000:14.1f} ms")


def _local_flags(strategy: str, salt: str) -> list[str]:
    return [
        f"--spawn_strategy={strategy}",
        f"--genrule_strategy={strategy}",
        "--disk_cache=",
        "--incompatible_strict_action_env",
        *_salted(salt),
        "//...",
    ]


def _salted(salt: str) -> list[str]:
    """An environment variable of the round's own in every action (the tool built for the host
    configuration too), so that no round finds another's results in a cache."""
    return [f"--action_env=EXPBUILD_BENCH_ROUND={salt}", f"--host_action_env=EXPBUILD_BENCH_ROUND={salt}"]


def bazel_rounds(binary: str, target: str, rounds: int) -> None:
    """Cold remote, cached remote and local builds, ``rounds`` times each, interleaved."""
    root = Path(tempfile.mkdtemp(prefix="expbuild-bench-bazel-"))
    bazel = Bazel(binary=binary, root=root, server=True)
    try:
        bazel("info", "output_base")  # starts the server: its start-up is not part of any build
        local = _local_strategy(bazel)
        times: dict[str, list[float]] = {"cold": [], "cached": [], "local": []}
        for i in range(rounds + 1):  # round 0 warms the JVM up and is not counted
            salt = f"round{i}"

            def remote(kind: str, salt: str = salt) -> None:
                run = bazel("build", *remote_flags(target, *_salted(salt)))
                want = "remote" if kind == "cold" else "remote cache hit"
                if run.processes().get(want) != ACTIONS:
                    raise BazelFailed(f"a {kind} build ran {run.processes()}, not {ACTIONS} {want}")

            measured = {}
            bazel("clean")
            measured["cold"] = _wall(lambda: remote("cold"))
            bazel("clean")
            measured["cached"] = _wall(lambda: remote("cached"))
            bazel("clean")
            measured["local"] = _wall(lambda salt=salt: bazel("build", *_local_flags(local, salt)))
            if i > 0:
                for kind, seconds in measured.items():
                    times[kind].append(seconds)
        median = {kind: statistics.median(values) for kind, values in times.items()}
        print(f"  local: Bazel's {local} ({ACTIONS} genrule spawns; medians of {rounds} rounds)")
        for kind, label in (
            ("cold", "remote, cold (every action executes on the worker)"),
            ("cached", "remote, fully cached (every action an AC hit)"),
            ("local", f"local, {local}"),
        ):
            samples = ", ".join(f"{s:.2f}" for s in times[kind])
            print(f"  {label:<52} median {median[kind]:6.2f} s   ({samples})")
        for kind in ("cold", "cached"):
            ratio = median[kind] / median["local"]
            print(f"  ratio remote {kind} / local: {ratio:.3f}   (target <= 1.5: "
                  f"{'met' if ratio <= 1.5 else 'NOT met'})")  # fmt: skip
        where_the_time_goes(bazel, target)
    finally:
        try:
            bazel.shutdown()
        finally:
            shutil.rmtree(root, ignore_errors=True)


# ---- the run ---------------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> None:
    print(f"expbuild-worker REAPI benchmark: topology {args.topology}, {os.cpu_count()} CPUs, "
          f"python {sys.version.split()[0]}, grpc {grpc.__version__}")  # fmt: skip
    async with AsyncExitStack() as stack:
        base = await stack.enter_async_context(baseline_target(args.topology))
        target = await stack.enter_async_context(reapi_worker(args.topology))
        base_ch = grpc.aio.insecure_channel(base, options=CHANNEL_OPTIONS)
        stack.push_async_callback(base_ch.close)
        ch = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        stack.push_async_callback(ch.close)
        own = pb_grpc.WorkerServiceStub(ch)
        cas = re_grpc.ContentAddressableStorageStub(ch)
        ac = re_grpc.ActionCacheStub(ch)
        execution = re_grpc.ExecutionStub(ch)

        action = await upload_true_action(cas)
        await reapi_execute(execution, re_pb.ExecuteRequest(action_digest=action))  # now cached
        uncached = re_pb.ExecuteRequest(action_digest=action, skip_cache_lookup=True)
        echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = base_ch.unary_unary(ECHO_METHOD)
        payload = re_pb.GetActionResultRequest(action_digest=action).SerializeToString()

        print(f"\nround trips ({args.runs} runs each, interleaved in batches of 20):")
        timings = await interleaved(
            {
                "echo": lambda: echo_call(payload),
                "get": lambda: get_action_result(ac, action),
                "reapi": lambda: reapi_execute(execution, uncached),
                "own": lambda: run_action(own, true_request()),
            },
            args.runs,
        )
        echo, get, reapi, own_t = timings["echo"], timings["get"], timings["reapi"], timings["own"]
        print(echo.row("gRPC echo round trip (unary, generic handler)"))
        print(get.row("1. GetActionResult, cached /bin/true"))
        print(f"  ratio 1 / echo: median {get.median / echo.median:.3f}, p90 {get.p90 / echo.p90:.3f}")
        print(own_t.row("own API Execute /bin/true"))
        print(reapi.row("2. REAPI Execute /bin/true, skip_cache_lookup"))
        ratio = reapi.median / own_t.median
        print(f"  ratio 2 / own API: median {ratio:.3f}, p90 {reapi.p90 / own_t.p90:.3f}   (target <= 1.3: "
              f"{'met' if ratio <= 1.3 else 'NOT met'})")  # fmt: skip

        print(f"\n3. Bazel builds the tests/bazel workspace ({args.bazel_rounds} rounds):")
        binary = shutil.which("bazel")
        if binary is None:
            print("  skipped: no bazel on PATH (Debian: apt-get install bazel-bootstrap)")
            return
        try:
            await asyncio.to_thread(bazel_rounds, binary, target, args.bazel_rounds)
        except BazelFailed as err:
            print(f"  FAILED, no numbers: {err}")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topology", choices=["inprocess", "subprocess"], default="subprocess")
    parser.add_argument("--runs", type=int, default=300, help="samples per round-trip measurement")
    parser.add_argument("--bazel-rounds", type=int, default=3, help="timed Bazel rounds (after one warm-up)")
    args = parser.parse_args()
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
