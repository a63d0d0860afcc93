"""A small mixed load on the worker as a separate process: every byte checked, nothing lost or leaked."""

from __future__ import annotations

import asyncio

from _load_support import (
    after_stop,
    build_docker_image,
    docker_engine_answers,
    leaks,
    make_specs,
    run_load,
    settle,
    worker_process,
)
from _support import required, unavailable, wait_gone

ACTIONS = 60
CLIENTS = 10


def test_mixed_load_arrives_byte_exact_once_and_leaves_nothing_behind(tmp_path):
    """Concurrent clients must each get their own action's bytes exactly once, with a bounded store
    evicting under them, cancellations and timeouts among them, and the worker must end as it began."""
    docker = docker_engine_answers()
    if not docker and required("EXPBUILD_REQUIRE_DOCKER"):  # the Docker share may not vanish in CI
        unavailable("no Docker engine answers", flag="EXPBUILD_REQUIRE_DOCKER")
    image = build_docker_image() if docker else None
    # 32 MiB: over what four running actions can pin at once (about 28 MiB), under what the load writes.
    with worker_process(
        tmp_path, docker_image=image, concurrency=4, queued=64, store_bytes=32 << 20
    ) as worker:
        warmup = make_specs(
            12,
            seed=1,
            docker_share=0.25 if docker else 0.0,
            large_share=0.2,
            stop_share=0.0,
            large_bytes=1 << 20,
        )
        assert asyncio.run(run_load(worker.target, warmup, CLIENTS)).problems == []
        settle(lambda: worker.snapshot().children or worker.action_directories())
        baseline = worker.snapshot()

        specs = make_specs(
            ACTIONS,
            seed=2,
            docker_share=0.1 if docker else 0.0,
            large_share=0.15,
            stop_share=0.15,
            large_bytes=2 << 20,
        )
        report = asyncio.run(run_load(worker.target, specs, CLIENTS))
        print(report.summary())
        found, after = leaks(worker, baseline, docker=docker)
        print(f"worker RSS {baseline.rss_kib} KiB before, {after.rss_kib} KiB after")
        print(
            f"threads {baseline.threads} -> {after.threads}; fds {baseline.fd_count()} -> {after.fd_count()}"
        )
        status = worker.stop()
        assert wait_gone(worker.pid)
    problems = report.problems + found + after_stop(worker, docker=docker)
    assert status == 0, f"worker exited {status}"
    assert problems == [], "\n".join(problems[:40])
