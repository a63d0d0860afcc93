"""GetWorkerStatus and WatchWorkerStatus: what a scheduler needs to place work without polling."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest
from _support import request
from google.protobuf.duration_pb2 import Duration

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc

SH = "/bin/sh"
LONG = [SH, "-c", "exec sleep 60"]


class Background:
    """An Execute stream read on a thread; ``accepted`` is set once the worker admitted it."""

    def __init__(self, stub: pb_grpc.WorkerServiceStub, execution_id: str) -> None:
        self.accepted = threading.Event()
        self.position = -1
        self.status: int | None = None
        self._stream = stub.Execute(request(LONG, execution_id=execution_id), timeout=60)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for response in self._stream:
            kind = response.WhichOneof("event")
            if kind == "accepted":
                self.position = response.accepted.queue_position
                self.accepted.set()
            elif kind == "result":
                self.status = response.result.status

    def join(self) -> None:
        self._thread.join(30)


def _status(stub: pb_grpc.WorkerServiceStub) -> pb.WorkerStatus:
    return stub.GetWorkerStatus(pb.GetWorkerStatusRequest(), timeout=10).status


def _next_where(statuses: Iterator[pb.WatchWorkerStatusResponse], check) -> pb.WorkerStatus:
    for response in statuses:
        if check(response.status):
            return response.status
    raise AssertionError("the watch stream ended before the expected status")


def test_status_counts_running_and_queued_actions_and_free_places(start_worker):
    """A scheduler sees exactly how many actions hold slots and wait, and what is still free."""
    worker = start_worker({"execution": {"max_concurrent_executions": 1, "max_queued_executions": 3}})
    stub = worker.stub()
    idle = _status(stub)
    assert (idle.running_executions, idle.queued_executions, idle.free_slots) == (0, 0, 1)
    assert idle.free_queue_places == 3 and idle.accepting
    assert idle.worker_id == worker.config.server.worker_id

    first = Background(stub, "status-running")
    assert first.accepted.wait(30)
    second = Background(stub, "status-queued")
    assert second.accepted.wait(30) and second.position == 1

    busy = _status(stub)
    assert (busy.running_executions, busy.queued_executions) == (1, 1)
    assert (busy.free_slots, busy.free_queue_places) == (0, 2)
    assert (busy.max_concurrent_executions, busy.max_queued_executions) == (1, 3)
    (host,) = busy.executors
    assert (host.name, host.ready, host.running_executions, host.free_slots) == ("host", True, 1, 0)
    assert busy.version > idle.version

    for execution_id in ("status-queued", "status-running"):
        stub.CancelExecution(pb.CancelExecutionRequest(execution_id=execution_id), timeout=10)
    first.join()
    second.join()
    after = _status(stub)
    assert (after.running_executions, after.queued_executions, after.free_slots) == (0, 0, 1)


def test_a_watch_sees_an_action_start_and_end(start_worker):
    """Without polling, the scheduler learns that a slot was taken and given back."""
    worker = start_worker()
    stub = worker.stub()
    statuses = stub.WatchWorkerStatus(pb.WatchWorkerStatusRequest(), timeout=60)
    first = next(statuses).status
    assert first.running_executions == 0

    action = Background(stub, "watched")
    running = _next_where(statuses, lambda s: s.running_executions == 1)
    assert running.version > first.version
    assert running.executors[0].running_executions == 1

    stub.CancelExecution(pb.CancelExecutionRequest(execution_id="watched"), timeout=10)
    done = _next_where(statuses, lambda s: s.running_executions == 0)
    assert done.version > running.version
    statuses.cancel()
    action.join()
    assert action.status == pb.EXECUTION_STATUS_CANCELLED


def test_a_watch_ends_with_a_status_that_accepts_nothing_when_the_worker_stops(start_worker):
    """A scheduler learns of a shutdown from the stream itself, not from a broken connection."""
    worker = start_worker()
    with grpc.insecure_channel(worker.target) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        statuses = stub.WatchWorkerStatus(pb.WatchWorkerStatusRequest(), timeout=60)
        assert next(statuses).status.accepting
        seen: list[pb.WorkerStatus] = []
        reader = threading.Thread(target=lambda: seen.extend(r.status for r in statuses), daemon=True)
        reader.start()
        worker.stop()
        reader.join(30)
        assert not reader.is_alive()
        assert seen and not seen[-1].accepting


def test_a_misconfigured_docker_executor_is_reported_not_ready_with_its_reason(start_worker):
    """A scheduler must not send container work to a worker whose Docker daemon is unreachable,
    and the reason tells the operator what to fix."""
    worker = start_worker(
        {
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
    executors = {e.name: e for e in _status(worker.stub()).executors}
    assert list(executors) == ["host", "docker"]
    assert executors["host"].ready and not executors["host"].readiness_message
    assert not executors["docker"].ready
    assert executors["docker"].readiness_message


def test_a_negative_interval_is_invalid(worker):
    """A watch with a negative interval is a client bug, named rather than silently replaced."""
    request = pb.WatchWorkerStatusRequest(min_interval=Duration(seconds=-1))
    with pytest.raises(grpc.RpcError) as err:
        next(worker.stub().WatchWorkerStatus(request, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "min_interval" in err.value.details()
