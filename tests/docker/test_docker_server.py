"""The Docker executor behind the real gRPC server: outputs, inputs and statuses as a client sees them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from _dockerkit import new_worker_id, remove_labelled
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


def test_missing_image_is_failed_precondition(docker_worker: Any) -> None:
    """A missing image under `never` ends the call with FAILED_PRECONDITION naming the image."""
    worker = docker_worker(image="expbuild-test/not-there:1", pull_policy="never")
    with pytest.raises(grpc.RpcError) as info:
        execute(worker.stub(), request(["true"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "expbuild-test/not-there:1" in info.value.details()


def test_network_access_is_refused_before_accepted_unless_configured(docker_worker: Any) -> None:
    """Without network_mode_when_enabled, asking for network is FAILED_PRECONDITION before the
    action is accepted: it never ran."""
    worker = docker_worker()
    events = []
    with pytest.raises(grpc.RpcError) as info:
        req = request(["true"], limits=pb.ResourceLimits(network=pb.NETWORK_ACCESS_ENABLED))
        for resp in worker.stub().Execute(req, timeout=30):
            events.append(resp.WhichOneof("event"))
    assert events == []
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith("limits.network:"), info.value.details()


def test_capabilities_list_the_docker_executor(docker_worker: Any) -> None:
    """GetCapabilities shows the Docker executor with container isolation and live engine details."""
    worker = docker_worker()
    caps = worker.stub().GetCapabilities(pb.GetCapabilitiesRequest(), timeout=30)
    docker = next(e for e in caps.executors if e.name == "docker")
    assert docker.isolation_level == pb.ISOLATION_LEVEL_CONTAINER
    assert docker.ready, docker.readiness_message
    assert docker.details["engine_version"] and docker.details["cgroup_version"]
