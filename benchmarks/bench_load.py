"""A mixed load on the worker as a separate process: throughput, latency, memory, and every result checked.

1000 actions (default) from 50 concurrent clients, host and Docker mixed (Docker only when an engine
answers; the busybox image is built locally by scripts/build-test-image.sh, nothing is pulled), with
small and large logs and outputs, uploaded inputs through a bounded store, exit codes, and random
cancellations, disconnects and timeouts. Every log and output is checked byte-exact against the sha256
of what its command was told to write (computed here, independently of the worker); each action must
have "accepted" first, one result last and contiguous offsets, and run exactly once. Afterwards the
worker must hold no more child processes, containers, cgroups, file descriptors, threads, action
directories or half-written blobs than before, and none once it has exited.

Prints the worker's RSS before and after, throughput and latency percentiles. The worker binds
127.0.0.1 on a free port and is stopped by its pid at the end. Exit status 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
from pathlib import Path

from expbuild_worker.execution.host import disable_grpc_fork_handlers

disable_grpc_fork_handlers()  # as the expbuild-worker command does, before grpc is imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import grpc  # noqa: E402
from _common import work_directory  # noqa: E402
from _load_support import (  # noqa: E402
    after_stop,
    build_docker_image,
    docker_engine_answers,
    leaks,
    make_specs,
    run_load,
    settle,
    worker_process,
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--actions", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8, help="the worker's max_concurrent_executions")
    parser.add_argument(
        "--docker-share", type=float, default=0.15, help="share of Docker actions (with an engine)"
    )
    parser.add_argument(
        "--large-share", type=float, default=0.08, help="share of actions with large logs/outputs"
    )
    parser.add_argument(
        "--large-bytes", type=int, default=4 << 20, help="largest log or output of a large action"
    )
    parser.add_argument(
        "--stop-share", type=float, default=0.08, help="share cancelled, disconnected or timed out"
    )
    parser.add_argument(
        "--store-bytes", type=int, default=128 << 20, help="the store's bound (storage.max_bytes)"
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-docker", action="store_true", help="host actions only")
    args = parser.parse_args()

    docker = not args.no_docker and docker_engine_answers()
    image = build_docker_image() if docker else None
    print(f"expbuild-worker load benchmark: {args.actions} actions, {args.clients} clients, concurrency "
          f"{args.concurrency}, Docker {'on' if docker else 'off (no engine answers)'}, store "
          f"{args.store_bytes >> 20} MiB, {os.cpu_count()} CPUs, grpc {grpc.__version__}")  # fmt: skip
    work = work_directory("expbuild-load-")
    try:
        with worker_process(
            work,
            docker_image=image,
            concurrency=args.concurrency,
            queued=2 * args.clients,
            store_bytes=args.store_bytes,
        ) as worker:
            share = args.docker_share if docker else 0.0
            warmup = make_specs(
                2 * args.clients, seed=args.seed + 1, docker_share=share, large_share=0.1,
                stop_share=0.0, large_bytes=1 << 20,
            )  # fmt: skip
            warm = asyncio.run(run_load(worker.target, warmup, args.clients))
            settle(lambda: worker.snapshot().children or worker.action_directories())
            before = worker.snapshot()
            print(f"warm-up: {warm.summary()}")
            specs = make_specs(
                args.actions, seed=args.seed, docker_share=share, large_share=args.large_share,
                stop_share=args.stop_share, large_bytes=args.large_bytes,
            )  # fmt: skip
            report = asyncio.run(run_load(worker.target, specs, args.clients))
            print(f"load:    {report.summary()}")
            found, after = leaks(worker, before, docker=docker)
            rss = f"{before.rss_kib / 1024:.1f} MiB after warm-up, {after.rss_kib / 1024:.1f} MiB after"
            print(f"worker RSS {rss} (peak {after.hwm_kib / 1024:.1f} MiB)")
            print(
                f"worker threads {before.threads} -> {after.threads}; "
                f"fds {dict(before.fds)} -> {dict(after.fds)}"
            )
            status = worker.stop()
        problems = warm.problems + report.problems + found + after_stop(worker, docker=docker)
        if status != 0:
            problems.append(f"worker exited {status}")
        print(f"\n{len(problems)} problems")
        for problem in problems[:60]:
            print(f"  {problem}")
        if problems:
            print(f"worker log ({worker.log}):")
            print("  " + "\n  ".join(worker.log.read_text().splitlines()[-30:]))
        return 1 if problems else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
