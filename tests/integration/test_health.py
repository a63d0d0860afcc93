"""The standard health service tells the truth: SERVING only for what can run an action now."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _status(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10).status


def test_a_ready_worker_serves_overall_per_front_door_and_per_executor(worker):
    """Schedulers and load balancers can ask for the whole worker, a front door, or one executor."""
    for service in (
        "",
        "expbuild.worker.v1.WorkerService",
        "build.bazel.remote.execution.v2.Execution",
        "build.bazel.remote.execution.v2.ContentAddressableStorage",
        "expbuild.worker.v1.WorkerService/host",
    ):
        assert _status(worker.target, service) == SERVING, service


def test_a_default_executor_that_cannot_run_makes_the_worker_not_serving(start_worker):
    """A worker whose Docker engine is down says NOT_SERVING overall, while its store still serves."""
    worker = start_worker(
        {
            "execution": {"default_executor": "docker"},
            "executor": {
                "host": {"type": "host"},
                "docker": {
                    "type": "docker",
                    "docker_host": "unix:///nonexistent/docker.sock",
                    "image": "busybox:latest",
                    "orphan_sweep_interval_seconds": 0,
                },
            },
        }
    )
    assert _status(worker.target, "") == NOT_SERVING
    assert _status(worker.target, "expbuild.worker.v1.WorkerService") == NOT_SERVING
    assert _status(worker.target, "expbuild.worker.v1.WorkerService/docker") == NOT_SERVING
    assert _status(worker.target, "expbuild.worker.v1.WorkerService/host") == SERVING
    assert _status(worker.target, "build.bazel.remote.execution.v2.ContentAddressableStorage") == SERVING
