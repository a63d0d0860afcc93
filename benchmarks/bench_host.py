"""Host executor overhead, streaming throughput and concurrency, each beside its raw baseline, in one run.

Prints, measured in this run on this machine:

1. raw spawn of /bin/true (subprocess.run), median and p90;
2. a gRPC echo round trip (a trivial unary echo server built with a generic handler, same grpc
   aio stack, same topology as the worker);
3. end-to-end Execute of /bin/true through the worker, and the ratio 3 / (1 + 2) (target <= 1.5);
   beside it the transport floor: a bare streaming handler in the baseline server that writes
   three messages (accepted, started, result) around a Popen of /bin/true and a pidfd wait, with
   no engine, directory, pipes or cgroup, i.e. what any worker with this API pays before doing
   any work of its own (e2e minus floor is the worker's own overhead), and the same handler
   writing one message (what a wire that batches events could save); with cgroups, also a
   second worker that makes a new cgroup for every action (``reuse_cgroups = false``), in the
   same interleaved batches, so the gain of reused cgroups is measured in the same run;
4. 1 GiB of stdout streamed through Execute against a raw gRPC server stream of 64 KiB chunks
   (target ratio >= 0.5);
5. actions per second with 16 concurrent clients (with cgroups: reused, new per action, reused).

Topology: with ``--topology subprocess`` (default, as a worker is deployed) the worker and the
baseline servers each run in a child process, so client and server use both cores; with
``--topology inprocess`` the worker, the baseline servers and the clients share one process and
one event loop. Each
baseline runs in the same topology as the worker, so the ratios compare like with like.
Everything binds 127.0.0.1 on a free port and is stopped at the end. Exit status is 0 whether
or not a target is met: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # as the expbuild-worker command does, before grpc is imported

import grpc  # noqa: E402
from _common import child_target, interleaved, mb_s, work_directory, worker_target  # noqa: E402

from expbuild_worker.api.v1 import worker_pb2 as pb  # noqa: E402
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc  # noqa: E402

STREAM_CHUNK = 64 * 1024
ECHO_METHOD = "/bench.Echo/Echo"
STREAM_METHOD = "/bench.Echo/Stream"
FLOOR_METHOD = "/bench.Echo/Floor"
FLOOR1_METHOD = "/bench.Echo/Floor1"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20)]


# ---- baseline servers ---------------------------------------------------------------------------


def _baseline_handler() -> grpc.GenericRpcHandler:
    """Echo (unary, bytes in = bytes out) and Stream (request = 8-byte total, answer = 64 KiB chunks)."""
    chunk = b"\0" * STREAM_CHUNK

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        remaining = int.from_bytes(request, "big")
        while remaining > 0:
            piece = chunk if remaining >= STREAM_CHUNK else chunk[:remaining]
            remaining -= len(piece)
            yield piece

    def floor(messages: int) -> Any:
        """A handler that spawns /bin/true and waits for it, writing ``messages`` (3 or 1) messages."""

        async def handle(request: bytes, context: Any) -> None:
            # The request is a serialized ExecuteRequest: the floor receives what the worker does.
            loop = asyncio.get_running_loop()
            if messages == 3:
                await context.write(b"accepted".ljust(48))
            # As the worker does: a vfork spawn on the loop is quicker than a thread hop.
            child = subprocess.Popen(["/bin/true"], env=ENV, start_new_session=True)  # noqa: ASYNC220
            pidfd = os.pidfd_open(child.pid)
            exited = loop.create_future()
            loop.add_reader(pidfd, lambda: exited.done() or exited.set_result(None))
            if messages == 3:
                await context.write(b"started".ljust(16))
            try:
                await exited
            finally:
                loop.remove_reader(pidfd)
                os.close(pidfd)
            child.wait()
            await context.write(b"result".ljust(160))

        return grpc.unary_stream_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
            "Floor": floor(3),
            "Floor1": floor(1),
        },
    )


async def _start_baseline_server() -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((_baseline_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


async def _serve_baseline_forever() -> None:
    """Child-process mode: serve the baselines until stdin closes (the parent went away)."""
    server, port = await _start_baseline_server()
    print(f"baseline listening on 127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await server.stop(0)


@asynccontextmanager
async def baseline_target(topology: str) -> AsyncIterator[str]:
    if topology == "subprocess":
        async with child_target(
            [sys.executable, __file__, "--serve-baseline"], "baseline listening on"
        ) as target:
            yield target
        return
    server, port = await _start_baseline_server()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


def _worker_config(
    work: Path, concurrency: int, stream_bytes: int, cgroups: str, reuse: bool
) -> dict[str, Any]:
    return {
        "server": {
            "address": "127.0.0.1",
            "port": 0,
            "shutdown_grace_seconds": 0.0,
            "log_level": "warning",
            "worker_id": f"bench-{uuid.uuid4().hex[:8]}",
        },
        "execution": {
            "work_root": str(work / "work"),
            "max_concurrent_executions": concurrency,
            "max_queued_executions": 4 * concurrency,
            "max_log_bytes_per_stream": max(stream_bytes, 1 << 20),
        },
        "storage": {"path": str(work / "cas")},
        "executor": {"host": {"type": "host", "cgroups": cgroups, "reuse_cgroups": reuse}},
    }


@asynccontextmanager
async def host_worker(
    topology: str, concurrency: int, stream_bytes: int, cgroups: str, *, reuse: bool = True
) -> AsyncIterator[str]:
    work = work_directory("expbuild-bench-")
    try:
        config = _worker_config(work, concurrency, stream_bytes, cgroups, reuse)
        async with worker_target(topology, config, work) as target:
            yield target
    finally:
        shutil.rmtree(work, ignore_errors=True)


# ---- measurements -------------------------------------------------------------------------------


async def _asyncio_spawn() -> None:
    proc = await asyncio.create_subprocess_exec("/bin/true", env=ENV)
    await proc.wait()


def true_request() -> pb.ExecuteRequest:
    return pb.ExecuteRequest(argv=["/bin/true"], environment=ENV)


async def run_action(stub: pb_grpc.WorkerServiceAsyncStub, request: pb.ExecuteRequest) -> pb.ExecutionResult:
    result = None
    async for response in stub.Execute(request):
        if response.WhichOneof("event") == "result":
            result = response.result
    if result is None or result.status != pb.EXECUTION_STATUS_COMPLETED or result.exit_code != 0:
        raise RuntimeError(f"benchmark action failed: {result}")
    return result


async def drain(call: grpc.aio.UnaryStreamCall[bytes, bytes]) -> None:
    async for _ in call:
        pass


async def stream_through_worker(stub: pb_grpc.WorkerServiceAsyncStub, total: int) -> tuple[float, int]:
    """Seconds to receive ``total`` bytes of stdout through Execute, and the bytes counted."""
    request = pb.ExecuteRequest(argv=["head", "-c", str(total), "/dev/zero"], environment=ENV)
    received = 0
    start = time.perf_counter()
    result = None
    async for response in stub.Execute(request):
        kind = response.WhichOneof("event")
        if kind == "log":
            received += len(response.log.data)
        elif kind == "result":
            result = response.result
    elapsed = time.perf_counter() - start
    if result is None or result.stdout.truncated or received != total:
        raise RuntimeError(f"streamed {received} of {total} bytes; result: {result}")
    return elapsed, received


async def stream_raw(channel: grpc.aio.Channel, total: int) -> tuple[float, int]:
    call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(STREAM_METHOD)
    received = 0
    start = time.perf_counter()
    async for piece in call(total.to_bytes(8, "big")):
        received += len(piece)
    return time.perf_counter() - start, received


async def concurrent_actions(target: str, clients: int, per_client: int) -> tuple[float, int]:
    """Each client has its own channel and runs /bin/true ``per_client`` times back to back."""
    channels = [grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) for _ in range(clients)]
    try:
        stubs = [pb_grpc.WorkerServiceStub(ch) for ch in channels]
        for stub in stubs:
            await run_action(stub, true_request())

        async def client(stub: pb_grpc.WorkerServiceAsyncStub) -> None:
            for _ in range(per_client):
                await run_action(stub, true_request())

        start = time.perf_counter()
        await asyncio.gather(*(client(s) for s in stubs))
        return time.perf_counter() - start, clients * per_client
    finally:
        for ch in channels:
            await ch.close()


async def bench(args: argparse.Namespace) -> None:
    print(f"expbuild-worker host benchmark: topology {args.topology}, cgroups {args.cgroups}, "
          f"{os.cpu_count()} CPUs, python {sys.version.split()[0]}, grpc {grpc.__version__}")  # fmt: skip
    async with AsyncExitStack() as stack:
        base = await stack.enter_async_context(baseline_target(args.topology))
        target = await stack.enter_async_context(
            host_worker(args.topology, args.clients, args.stream_bytes, args.cgroups)
        )
        base_ch = grpc.aio.insecure_channel(base, options=CHANNEL_OPTIONS)
        stack.push_async_callback(base_ch.close)
        ch = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        stack.push_async_callback(ch.close)
        stub = pb_grpc.WorkerServiceStub(ch)
        probes: dict[str, Any] = {}
        fresh_target = ""
        if args.cgroups == "auto":  # beside it, the same worker with a new cgroup for every action
            fresh_target = await stack.enter_async_context(
                host_worker(args.topology, args.clients, 1 << 20, args.cgroups, reuse=False)
            )
            fresh_ch = grpc.aio.insecure_channel(fresh_target, options=CHANNEL_OPTIONS)
            stack.push_async_callback(fresh_ch.close)
            fresh_stub = pb_grpc.WorkerServiceStub(fresh_ch)
            probes["fresh"] = lambda: run_action(fresh_stub, true_request())

        echo_call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = base_ch.unary_unary(ECHO_METHOD)
        floor_call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = base_ch.unary_stream(FLOOR_METHOD)
        floor1_call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = base_ch.unary_stream(FLOOR1_METHOD)
        payload = true_request().SerializeToString()
        print(f"\nper-action overhead ({args.runs} runs each, interleaved in batches of 20):")
        timings = await interleaved(
            {
                "spawn": lambda: subprocess.run(["/bin/true"], check=True, env=ENV),
                "aspawn": _asyncio_spawn,
                "echo": lambda: echo_call(payload),
                "e2e": lambda: run_action(stub, true_request()),
                "floor": lambda: drain(floor_call(payload)),
                "floor1": lambda: drain(floor1_call(payload)),
                **probes,
            },
            args.runs,
        )
        spawn, echo, e2e = timings["spawn"], timings["echo"], timings["e2e"]
        print(spawn.row("1. raw spawn of /bin/true (subprocess.run)"))
        print(timings["aspawn"].row("   (for reference: asyncio subprocess spawn)"))
        print(echo.row("2. gRPC echo round trip (unary, generic handler)"))
        print(e2e.row("3. Execute /bin/true end to end"))
        ratio = e2e.median / (spawn.median + echo.median)
        ratio90 = e2e.p90 / (spawn.p90 + echo.p90)
        print(f"  ratio 3 / (1 + 2): median {ratio:.3f}, p90 {ratio90:.3f}   (target <= 1.5: "
              f"{'met' if ratio <= 1.5 else 'NOT met'})")  # fmt: skip
        base_median = spawn.median + echo.median
        floor, floor1 = timings["floor"], timings["floor1"]
        print(floor.row("   transport floor: 3 messages around Popen, no engine"))
        print(floor1.row("   the same with 1 message (a wire with batched events)"))
        print(f"  floors / (1 + 2): median {floor.median / base_median:.3f} (3 messages), "
              f"{floor1.median / base_median:.3f} (1 message)")  # fmt: skip
        print(f"  the worker's own overhead, 3 - floor: median {(e2e.median - floor.median) * 1e3:.3f} ms; "
              f"the target leaves {(1.5 * base_median - floor.median) * 1e3:.3f} ms for it")  # fmt: skip
        if "fresh" in timings:
            fresh = timings["fresh"]
            print(fresh.row("   3 with a new cgroup per action (reuse_cgroups=false)"))
            print(f"  its own overhead: median {(fresh.median - floor.median) * 1e3:.3f} ms; reuse saves "
                  f"{(fresh.median - e2e.median) * 1e3:.3f} ms (median), "
                  f"{(fresh.p90 - e2e.p90) * 1e3:.3f} ms (p90)")  # fmt: skip

        print(f"\nstreaming {args.stream_bytes / (1 << 30):g} GiB of stdout:")
        # raw, worker, raw: the worker is compared with the mean of the raw runs around it.
        raw1_s, raw_n = await stream_raw(base_ch, args.stream_bytes)
        wk_s, wk_n = await stream_through_worker(stub, args.stream_bytes)
        raw2_s, _ = await stream_raw(base_ch, args.stream_bytes)
        raw_s = (raw1_s + raw2_s) / 2
        print(f"  raw gRPC server stream, 64 KiB chunks (mean of 2) {mb_s(raw_s, raw_n)}")
        print(f"  Execute: head -c N /dev/zero                      {mb_s(wk_s, wk_n)}")
        tratio = (wk_n / wk_s) / (raw_n / raw_s)
        print(
            f"  ratio worker / raw: {tratio:.3f}   (target >= 0.5: {'met' if tratio >= 0.5 else 'NOT met'})"
        )

        print(f"\nconcurrency: {args.clients} clients, {args.per_client} actions each, /bin/true:")
        elapsed, n = await concurrent_actions(target, args.clients, args.per_client)
        print(f"  {n / elapsed:8.1f} actions/s ({n} actions in {elapsed:.2f} s, "
              f"max_concurrent_executions = {args.clients})")  # fmt: skip
        if fresh_target:
            elapsed, n = await concurrent_actions(fresh_target, args.clients, args.per_client)
            print(f"  {n / elapsed:8.1f} actions/s with a new cgroup per action (reuse_cgroups=false)")
            elapsed, n = await concurrent_actions(target, args.clients, args.per_client)
            print(
                f"  {n / elapsed:8.1f} actions/s reused again (the first run's machine may have been busier)"
            )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--topology", choices=["inprocess", "subprocess"], default="subprocess")
    parser.add_argument("--runs", type=int, default=300, help="samples per latency measurement (>= 200)")
    parser.add_argument("--stream-bytes", type=int, default=1 << 30, help="bytes streamed (default 1 GiB)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument(
        "--cgroups", choices=["auto", "off"], default="auto", help="the host executor's cgroups setting"
    )
    parser.add_argument("--per-client", type=int, default=50, help="actions per concurrent client")
    parser.add_argument("--serve-baseline", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_baseline:
        asyncio.run(_serve_baseline_forever())
        return 0
    asyncio.run(bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
