"""Health on the real engine: a missing image under pull policy "never" is reported, not hidden."""

from __future__ import annotations

import logging
from typing import Any

import grpc
from _dockerkit import new_worker_id, remove_labelled
from grpc_health.v1 import health_pb2, health_pb2_grpc

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVING = health_pb2.HealthCheckResponse.SERVING


def _status(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_missing_image_under_pull_never_is_not_serving_and_warned(
    start_worker: Any, busybox_image: str, docker_client: Any, caplog: Any
) -> None:
    """Capabilities and health agree: the worker cannot run its default action, and says why at start."""
    worker_id = new_worker_id()
    caplog.set_level(logging.WARNING)
    try:
        ok = start_worker(
            {
                "server": {"worker_id": worker_id},
                "execution": {"default_executor": "docker"},
                "executor": {"docker": {"type": "docker", "image": busybox_image, "pull_policy": "never"}},
            }
        )
        assert _status(ok.target, "") == SERVING
        missing = start_worker(
            {
                "server": {"worker_id": worker_id + "-missing"},
                "execution": {"default_executor": "docker"},
                "executor": {
                    "docker": {"type": "docker", "image": "expbuild-test/absent:none", "pull_policy": "never"}
                },
            }
        )
        assert _status(missing.target, "") == NOT_SERVING
        assert _status(missing.target, "expbuild.worker.v1.WorkerService/docker") == NOT_SERVING
        assert any("expbuild-test/absent:none" in r.getMessage() for r in caplog.records)
    finally:
        remove_labelled(docker_client, worker_id)
        remove_labelled(docker_client, worker_id + "-missing")
