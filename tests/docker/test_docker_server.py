"""The Docker executor behind the real gRPC server: outputs, inputs and statuses as a client sees them."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from _dockerkit import gone_within, new_worker_id, remove_labelled
from _support import execute, request
from google.protobuf.duration_pb2 import Duration

from expbuild_worker.api.v1 import worker_pb2 as pb

pytestmark = pytest.mark.docker

SH = "/bin/sh"
IO_MODES = pytest.mark.parametrize("io_mode", ["bind", "archive"])


@pytest.fixture
def docker_worker(start_worker: Callable[..., Any], busybox_image: str, docker_client: Any) -> Any:
    """Factory: a worker whose default executor is Docker (with ``settings``), with its own worker id."""
    worker_ids: list[str] = []

    def factory(**settings: Any) -> Any:
        worker_id = new_worker_id()
        worker_ids.append(worker_id)
        executor = {"type": "docker", "image": busybox_image, "orphan_sweep_interval_seconds": 0, **settings}
        return start_worker(
            {
                "server": {"worker_id": worker_id},
                "execution": {"default_executor": "docker"},
                "executor": {"docker": executor},
            }
        )

    yield factory
    for worker_id in worker_ids:
        remove_labelled(docker_client, worker_id)


@IO_MODES
def test_outputs_nested_executable_empty_and_symlink(docker_worker: Any, io_mode: str) -> None:
    """Container outputs arrive byte-exact with exec bits, empty files, nested dirs and symlinks as links."""
    script = (
        "mkdir -p out/a/b && printf hello > out/a/b/f.txt && : > out/empty && "
        "printf '#!/bin/sh\\n' > out/tool && chmod +x out/tool && ln -s a/b/f.txt out/link && "
        "mkdir out/emptydir && printf single > single.txt"
    )
    worker = docker_worker(io_mode=io_mode)
    run = execute(
        worker.stub(),
        request([SH, "-c", script], output_files=["single.txt", "absent.txt"], output_directories=["out"]),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED, bytes(run.stderr)
    assert run.accepted is not None and run.accepted.isolation_level == pb.ISOLATION_LEVEL_CONTAINER
    files = {f.path: f for f in run.result.output_files}
    assert sorted(files) == ["out/a/b/f.txt", "out/empty", "out/tool", "single.txt"]
    assert bytes(run.outputs["out/a/b/f.txt"]) == b"hello"
    assert bytes(run.outputs["out/empty"]) == b""
    assert files["out/tool"].is_executable and not files["single.txt"].is_executable
    assert files["single.txt"].digest.sha256 == hashlib.sha256(b"single").hexdigest()
    assert [(s.path, s.target) for s in run.result.output_symlinks] == [("out/link", "a/b/f.txt")]
    assert [d.path for d in run.result.output_directories] == ["out", "out/a", "out/a/b", "out/emptydir"]


@IO_MODES
def test_output_symlink_to_a_host_secret_is_not_followed(docker_worker: Any, io_mode: str) -> None:
    """A container can plant out -> /etc/shadow; the worker reports the link, never the host's file."""
    worker = docker_worker(io_mode=io_mode)
    run = execute(
        worker.stub(),
        request(
            [SH, "-c", "ln -s /etc/shadow leak && mkdir d && ln -s /etc d/etc && ln -s /etc dirlink"],
            output_files=["leak", "dirlink/shadow"],
            output_directories=["d"],
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED, bytes(run.stderr)
    assert {(s.path, s.target) for s in run.result.output_symlinks} == {
        ("leak", "/etc/shadow"),
        ("d/etc", "/etc"),
    }
    assert run.result.output_files == [] and run.outputs == {}


@IO_MODES
def test_inputs_and_working_directory(docker_worker: Any, io_mode: str) -> None:
    """Inputs (nested, executable, symlinked) are where the command looks, and it runs in its workdir."""
    worker = docker_worker(io_mode=io_mode)
    run = execute(
        worker.stub(),
        request(
            [SH, "-c", "cat ../data/f; cat ../link; test -x ../data/f && echo x; ls -d ../empty; echo o > o"],
            working_directory="sub/dir",
            input_files=[pb.InputFile(path="sub/data/f", content=b"inline\n", is_executable=True)],
            input_directories=[pb.InputDirectory(path="sub/empty")],
            input_symlinks=[pb.InputSymlink(path="sub/link", target="data/f")],
            output_files=["sub/dir/o"],
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED, bytes(run.stderr)
    assert bytes(run.stdout).decode().splitlines() == ["inline", "inline", "x", "../empty"]
    assert bytes(run.outputs["sub/dir/o"]) == b"o\n"


def test_timeout_through_the_server(docker_worker: Any) -> None:
    """`sleep 600` with a 1 s timeout comes back TIMED_OUT through the whole worker."""
    worker = docker_worker()
    run = execute(worker.stub(), request(["sleep", "600"], timeout=Duration(seconds=1)))
    assert run.status == pb.EXECUTION_STATUS_TIMED_OUT
    # Killed, not exited: the signal, not the init's 128 + N as an exit code.
    assert run.result.exit_code == 0 and run.result.signal in (9, 15), run.result


def test_a_process_limit_of_one_is_the_command_s_own(docker_worker: Any) -> None:
    """max_processes counts the command's processes; the container's init does not eat into it."""
    worker = docker_worker()
    run = execute(worker.stub(), request(["echo", "alone"], limits=pb.ResourceLimits(max_processes=1)))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED and run.result.exit_code == 0, bytes(run.stderr)
    assert bytes(run.stdout) == b"alone\n"


def test_missing_image_is_failed_precondition(docker_worker: Any) -> None:
    """A missing image under `never` ends the call with FAILED_PRECONDITION naming the image."""
    worker = docker_worker(image="expbuild-test/not-there:1", pull_policy="never")
    with pytest.raises(grpc.RpcError) as info:
        execute(worker.stub(), request(["true"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expbuild-test/not-there:1" in info.value.details()


@pytest.mark.parametrize(
    ("code", "field", "kwargs"),
    [
        (
            "FAILED_PRECONDITION",
            "limits.network",
            {"limits": pb.ResourceLimits(network=pb.NETWORK_ACCESS_ENABLED)},
        ),
        ("FAILED_PRECONDITION", "container_image", {"container_image": "expbuild-test/elsewhere:1"}),
        ("INVALID_ARGUMENT", "container_image", {"container_image": "Bad Image"}),
        ("FAILED_PRECONDITION", "limits.memory_bytes", {"limits": pb.ResourceLimits(memory_bytes=1)}),
        ("FAILED_PRECONDITION", "limits.cpu_cores", {"limits": pb.ResourceLimits(cpu_cores=1e-12)}),
        ("FAILED_PRECONDITION", "limits.cpu_cores", {"limits": pb.ResourceLimits(cpu_cores=10000)}),
    ],
    ids=[
        "network",
        "image-not-allowed",
        "image-malformed",
        "memory-tiny",
        "cpu-tiny",
        "cpu-more-than-machine",
    ],
)
def test_what_the_executor_would_refuse_is_refused_before_accepted(
    docker_worker: Any, code: str, field: str, kwargs: dict[str, Any]
) -> None:
    """The action never ran: no `accepted`, a status naming the field. Without this, a tiny CPU
    limit rounded to none and ran unlimited, and the others failed only after `accepted`."""
    worker = docker_worker()
    events = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in worker.stub().Execute(request(["true"], **kwargs), timeout=30):
            events.append(resp.WhichOneof("event"))
    assert events == []
    assert info.value.code() == getattr(grpc.StatusCode, code)
    assert info.value.details().startswith(f"{field}:"), info.value.details()


def test_a_client_gone_while_the_container_is_created_leaves_no_container(
    docker_worker: Any, docker_client: Any
) -> None:
    """Cancelling the call at any moment around the daemon's create removes the container at
    once (the periodic sweep is off here), instead of leaving it in `Created` for the janitor."""
    worker = docker_worker()
    worker_id = worker.config.server.worker_id
    stub = worker.stub()
    for delay in (0.0, 0.002, 0.005, 0.008, 0.012, 0.02, 0.03, 0.05):
        responses = stub.Execute(request(["sleep", "5"]), timeout=30)
        assert next(responses).WhichOneof("event") == "accepted"
        time.sleep(delay)
        responses.cancel()
        assert gone_within(docker_client, worker_id, 10), f"container left after a cancel at {delay}s"


@IO_MODES
def test_outputs_nested_too_deep_end_as_an_output_limit_quickly(docker_worker: Any, io_mode: str) -> None:
    """400 nested directories: OUTPUT_LIMIT_EXCEEDED with the exit code, in seconds (unpacking
    such a tree from the daemon's archive used to take minutes and hold a slot)."""
    worker = docker_worker(io_mode=io_mode)
    deep = "i=0; while [ $i -lt 400 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; echo x > f"
    started = time.monotonic()
    run = execute(worker.stub(), request(["sh", "-c", deep], output_directories=["d"]))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED and run.result.exit_code == 0
    assert "nested deeper than 256 levels" in run.result.message
    assert list(run.result.output_files) == []
    assert time.monotonic() - started < 30


def test_capabilities_list_the_docker_executor(docker_worker: Any) -> None:
    """GetCapabilities shows the Docker executor with container isolation and live Docker daemon details."""
    worker = docker_worker()
    caps = worker.stub().GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30)
    docker = next(e for e in caps.executors if e.name == "docker")
    assert docker.isolation_level == pb.ISOLATION_LEVEL_CONTAINER
    assert docker.ready, docker.readiness_message
    assert docker.details["engine_version"] and docker.details["cgroup_version"]
