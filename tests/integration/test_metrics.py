"""Prometheus metrics, scraped over HTTP from a real worker after real actions."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from _support import execute, request
from prometheus_client.parser import text_string_to_metric_families

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.errors import ConfigError

SH = "/bin/sh"
METRICS = {"metrics": {"enabled": True, "address": "127.0.0.1", "port": 0}}


def scrape(worker) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample the endpoint serves, by name and sorted labels."""
    endpoint = worker.server.metrics
    assert endpoint is not None
    with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when(worker, ready) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A scrape once ``ready(samples)`` holds, for at most 10 s (then the last one): the worker
    counts an RPC as it finishes the call, which can be just after the client has its status."""
    deadline = time.monotonic() + 10
    while True:
        samples = scrape(worker)
        if ready(samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.02)


def test_finished_actions_are_counted_by_status_with_bytes_and_stage_durations(start_worker):
    """An operator reads from the scrape how many actions ran, how they ended, what they wrote
    and where their time went, whatever the exit code."""
    worker = start_worker(METRICS)
    stub = worker.stub()
    script = "printf hello; printf err >&2; printf 1234567 > out.txt"
    ok = execute(stub, request([SH, "-c", script], output_files=["out.txt"]))
    failed = execute(stub, request([SH, "-c", "exit 3"]))
    assert ok.status == failed.status == pb.EXECUTION_STATUS_COMPLETED

    execute_method = "expbuild.worker.v1.WorkerService/Execute"
    samples = scrape_when(
        worker, lambda got: value(got, "expbuild_worker_rpcs_total", method=execute_method, code="OK") >= 2
    )
    assert value(samples, "expbuild_worker_actions_total", executor="host", status="completed") == 2
    assert value(samples, "expbuild_worker_log_bytes_total", executor="host", stream="stdout") == 5
    assert value(samples, "expbuild_worker_log_bytes_total", executor="host", stream="stderr") == 3
    assert value(samples, "expbuild_worker_output_bytes_total", executor="host") == 7
    for stage in ("queued", "input_staging", "execution", "output_collection", "total"):
        count = value(
            samples, "expbuild_worker_action_stage_duration_seconds_count", executor="host", stage=stage
        )
        assert count == 2, stage
    assert value(samples, "expbuild_worker_engine_errors_total", executor="host") == 0
    execute_calls = value(
        samples, "expbuild_worker_rpcs_total", method="expbuild.worker.v1.WorkerService/Execute", code="OK"
    )
    assert execute_calls == 2
    timed = value(
        samples,
        "expbuild_worker_rpc_duration_seconds_count",
        method="expbuild.worker.v1.WorkerService/Execute",
    )
    assert timed == 2
    assert value(samples, "expbuild_worker_actions_running", executor="host") == 0
    assert value(samples, "expbuild_worker_actions_queued") == 0


def test_running_gauge_and_refusals_by_reason_follow_admission(start_worker):
    """A full worker and a bad request show up as refusals by reason and as RPC codes, and the
    running gauge shows the action holding the only slot."""
    worker = start_worker(
        {**METRICS, "execution": {"max_concurrent_executions": 1, "max_queued_executions": 0}}
    )
    stub = worker.stub()
    started = threading.Event()
    runs = {}

    def long_action() -> None:
        stream = stub.Execute(
            request([SH, "-c", "echo up; exec sleep 60"], execution_id="long-1"), timeout=60
        )
        for response in stream:
            if response.WhichOneof("event") == "log":
                started.set()
        runs["long"] = True

    thread = threading.Thread(target=long_action, daemon=True)
    thread.start()
    assert started.wait(30)
    with pytest.raises(grpc.RpcError) as full:
        execute(stub, request([SH, "-c", "true"]))
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.RpcError) as unknown:
        execute(stub, request([SH, "-c", "true"], executor=pb.ExecutorSelector(name="nope")))
    assert unknown.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    method = "expbuild.worker.v1.WorkerService/Execute"
    samples = scrape_when(
        worker,
        lambda got: value(got, "expbuild_worker_rpcs_total", method=method, code="INVALID_ARGUMENT") > 0,
    )
    assert value(samples, "expbuild_worker_actions_running", executor="host") == 1
    assert value(samples, "expbuild_worker_refusals_total", reason="ResourceExhaustedError") == 1
    assert value(samples, "expbuild_worker_refusals_total", reason="InvalidRequestError") == 1
    assert value(samples, "expbuild_worker_rpcs_total", method=method, code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "expbuild_worker_rpcs_total", method=method, code="INVALID_ARGUMENT") == 1

    stub.CancelExecution(pb.CancelExecutionRequest(execution_id="long-1"), timeout=10)
    thread.join(30)
    samples = scrape_when(
        worker, lambda got: value(got, "expbuild_worker_actions_running", executor="host") == 0
    )
    assert value(samples, "expbuild_worker_actions_total", executor="host", status="cancelled") == 1
    assert value(samples, "expbuild_worker_actions_running", executor="host") == 0


def test_two_workers_in_one_process_keep_their_own_numbers(start_worker):
    """Each worker has its own registry: one worker's actions never appear in another's scrape."""
    busy, idle = start_worker(METRICS), start_worker(METRICS)
    execute(busy.stub(), request([SH, "-c", "true"]))
    assert value(scrape(busy), "expbuild_worker_actions_total", executor="host", status="completed") == 1
    assert value(scrape(idle), "expbuild_worker_actions_total", executor="host", status="completed") == 0


def test_the_endpoint_stops_with_the_worker(start_worker):
    """A stopped worker leaves no metrics server behind on its port."""
    worker = start_worker(METRICS)
    port = worker.server.metrics.port
    worker.stop()
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_metrics_beyond_loopback_need_tls_or_an_explicit_insecure_setting(start_worker):
    """Metrics tell who runs what: a plain-HTTP endpoint on a public address is refused at start."""
    with pytest.raises(ConfigError, match=r"metrics\.address"):
        start_worker({"metrics": {"enabled": True, "address": "0.0.0.0", "port": 0}})


def test_metrics_are_off_unless_enabled(worker):
    """A worker without [metrics] opens no second port."""
    assert worker.server.metrics is None
