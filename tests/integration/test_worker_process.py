"""The worker as operators run it: a separate process, health, reflection, SIGTERM, memory."""

from __future__ import annotations

import signal
import time
from typing import Any

import grpc
import pytest
from _support import WorkerProcess, consume, pid_alive, request, wait_gone
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc


def long_action(stub: pb_grpc.WorkerServiceStub) -> Any:
    """Start an action that runs for ten minutes; return its stream once it is running."""
    responses = stub.Execute(request(["/bin/sh", "-c", "echo go; sleep 600"]), timeout=60)
    for resp in responses:
        if resp.WhichOneof("event") == "log":
            break
    return responses


@pytest.fixture
def worker_process(tmp_path):
    wp = WorkerProcess(tmp_path)
    yield wp
    wp.stop()


def test_health_serving_and_reflection_lists_the_api(worker_process):
    """Operators and grpcurl rely on the standard health service and server reflection."""
    with grpc.insecure_channel(worker_process.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "expbuild.worker.v1.WorkerService"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answer = next(
            iter(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        )
        names = {s.name for s in answer.list_services_response.service}
        assert {"expbuild.worker.v1.WorkerService", "grpc.health.v1.Health"} <= names


def test_capabilities_are_honest_about_the_host_executor(worker_process):
    """A plain process gets no network or CPU isolation, and capabilities say so."""
    with grpc.insecure_channel(worker_process.target) as ch:
        caps = pb_grpc.WorkerServiceStub(ch).GetCapabilities(pb.GetCapabilitiesRequest(), timeout=5)
    host = caps.executors[0]
    assert host.name == "host" and host.isolation_level == pb.ISOLATION_LEVEL_HOST and host.ready
    assert pb.RESOURCE_LIMIT_NETWORK in host.unenforced_limits
    assert pb.RESOURCE_LIMIT_CPU in host.unenforced_limits
    assert pb.RESOURCE_LIMIT_TIMEOUT in host.enforced_limits
    assert caps.platform.cpu_count >= 1 and caps.platform.memory_bytes > 0
    assert caps.versions.api == "expbuild.worker.v1" and caps.max_concurrent_executions == 4


def test_sigterm_during_an_action_leaves_nothing_behind(worker_process):
    """Graceful shutdown: the running action is cancelled after the grace, its processes and
    directory are gone, and the worker exits 0."""
    with grpc.insecure_channel(worker_process.target) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        responses = stub.Execute(request(["/bin/sh", "-c", "sleep 600 & echo $!; echo $$; wait"]), timeout=30)
        pids: list[int] = []
        events = []
        for resp in responses:
            events.append(resp)
            if resp.WhichOneof("event") == "log":
                pids += [int(x) for x in resp.log.data.split()]
                if len(pids) == 2:
                    worker_process.proc.send_signal(signal.SIGTERM)
                    break
        rest = list(responses)
        assert rest[-1].result.status == pb.EXECUTION_STATUS_CANCELLED
    assert worker_process.proc.wait(20) == 0
    for pid in pids:
        assert wait_gone(pid)
    assert list((worker_process.work_root / "actions").iterdir()) == []


def test_shutdown_cancels_queued_actions_at_once_and_a_second_signal_the_running_ones(tmp_path):
    """Queued actions never start once the worker shuts down: CANCELLED at once, not after the
    grace. The running one would get 60 s; a second SIGTERM cancels it now."""
    wp = WorkerProcess(tmp_path, execution={"max_concurrent_executions": 1}, grace=60.0)
    try:
        with grpc.insecure_channel(wp.target) as ch:
            stub = pb_grpc.WorkerServiceStub(ch)
            running = long_action(stub)
            queued = stub.Execute(request(["/bin/echo", "never"]), timeout=60)
            assert next(queued).accepted.queue_position == 1
            started = time.monotonic()
            wp.proc.send_signal(signal.SIGTERM)
            queued_events = list(queued)
            assert time.monotonic() - started < 5
            assert [e.WhichOneof("event") for e in queued_events] == ["result"]
            assert queued_events[0].result.status == pb.EXECUTION_STATUS_CANCELLED
            wp.proc.send_signal(signal.SIGTERM)
            assert list(running)[-1].result.status == pb.EXECUTION_STATUS_CANCELLED
            assert time.monotonic() - started < 10
        assert wp.proc.wait(20) == 0
    finally:
        wp.stop()


def test_new_work_during_shutdown_is_unavailable(tmp_path):
    """While draining, the worker refuses new actions with UNAVAILABLE and health says NOT_SERVING."""
    wp = WorkerProcess(tmp_path)
    try:
        with grpc.insecure_channel(wp.target) as ch:
            stub = pb_grpc.WorkerServiceStub(ch)
            long = long_action(stub)
            wp.proc.send_signal(signal.SIGTERM)
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 5
            status = None
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.02)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Execute(request(["/bin/true"]), timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            list(long)
    finally:
        wp.stop()


def test_100_mb_output_arrives_intact_without_growing_worker_memory(worker_process):
    """Outputs stream from disk in chunks: 100 MB arrive byte-exact while the worker's peak RSS
    grows by no more than a few tens of MB."""
    with grpc.insecure_channel(
        worker_process.target, options=[("grpc.max_receive_message_length", 8 << 20)]
    ) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        consume(
            stub.Execute(request(["/bin/sh", "-c", "head -c 1000000 /dev/urandom > o"], output_files=["o"]))
        )
        before = worker_process.vm_hwm_kib()
        script = "head -c 104857600 /dev/urandom > big && sha256sum big | cut -d' ' -f1 >&2"
        run = consume(
            stub.Execute(request(["/bin/sh", "-c", script], output_files=["big"]), timeout=120),
            keep_outputs=False,
        )
        after = worker_process.vm_hwm_kib()
    expected = bytes(run.stderr).strip().decode()
    assert run.result.output_files[0].digest.size_bytes == 100 * 1024 * 1024
    assert run.output_sha256["big"] == expected == run.result.output_files[0].digest.sha256
    print(f"worker peak RSS grew by {(after - before) / 1024:.1f} MiB")
    assert (after - before) < 40 * 1024, f"worker peak RSS grew by {(after - before) // 1024} MiB"


def test_peak_memory_of_a_large_allocation(worker_process):
    """A 300 MB allocation reports a peak of at least 300 MB (the worker itself stays far smaller)."""
    # dd reads 300 MB into one buffer: every page of it is touched.
    argv = ["/bin/dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"]
    with grpc.insecure_channel(worker_process.target) as ch:
        run = consume(pb_grpc.WorkerServiceStub(ch).Execute(request(argv), timeout=60))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert run.result.stats.peak_memory_bytes >= 300 << 20


def test_actions_with_limits_never_die_of_the_worker_s_grpc_fork_handlers(worker_process):
    """A limit makes the host executor fork this multi-threaded process to apply it before exec.
    With gRPC's fork handlers on (grpcio's default), about one such child in four died of SIGSEGV
    inside gRPC before exec; the command turns them off, so every run completes."""
    limits = pb.ResourceLimits(memory_bytes=256 << 20)
    with grpc.insecure_channel(worker_process.target) as ch:
        stub = pb_grpc.WorkerServiceStub(ch)
        results = [
            consume(stub.Execute(request(["/bin/echo", "hi"], limits=limits), timeout=30)).result
            for _ in range(40)
        ]
    assert [(r.status, r.exit_code, r.signal) for r in results] == [
        (pb.EXECUTION_STATUS_COMPLETED, 0, 0)
    ] * 40


def test_sigkill_of_the_worker_ends_its_running_command(worker_process):
    """A worker killed outright (SIGKILL: no shutdown code runs) takes its commands with it: a
    command placed in its cgroup before exec dies with the worker, instead of running on,
    unowned, until a restart sweeps its cgroup."""
    limits = pb.ResourceLimits(memory_bytes=256 << 20)  # a limit: started by the native helper
    channel = grpc.insecure_channel(worker_process.target)
    try:
        stub = pb_grpc.WorkerServiceStub(channel)
        responses = stub.Execute(
            request(["/bin/sh", "-c", "echo $$; exec sleep 600"], limits=limits), timeout=60
        )
        leader = 0
        for resp in responses:
            if resp.WhichOneof("event") == "log":
                leader = int(resp.log.data.split()[0])
                break
        assert leader and pid_alive(leader)
        worker_process.proc.send_signal(signal.SIGKILL)
        worker_process.proc.wait(10)
        assert wait_gone(leader), "the command outlived the worker"
        with pytest.raises(grpc.RpcError):
            list(responses)
    finally:
        channel.close()
