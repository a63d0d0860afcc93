"""A real Bazel builds a genrule workspace through the worker's Remote Execution API."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _bazelkit import ACTIONS, EXPECTED, Bazel, remote_flags

pytestmark = pytest.mark.timeout(900)

CONTAINER_USER = 4242
"""The Docker executor's user here: neither root nor the host executor's unprivileged user."""


@pytest.fixture
def docker_worker(start_worker: Callable[..., Any], busybox_image: str, docker_client: Any) -> Iterator[Any]:
    """A worker with the host executor as default and a Docker executor that allows the test image."""
    worker_id = f"test-bazel-{uuid.uuid4().hex[:12]}"
    yield start_worker(
        {
            "server": {"worker_id": worker_id},
            "execution": {"default_executor": "host"},
            "executor": {
                "docker": {
                    "type": "docker",
                    "image": busybox_image,
                    "allowed_images": [busybox_image],
                    "pull_policy": "never",
                    "user": f"{CONTAINER_USER}:{CONTAINER_USER}",
                    "orphan_sweep_interval_seconds": 0,
                }
            },
        }
    )
    for container in docker_client.api.containers(
        all=True, filters={"label": f"io.expbuild.worker-id={worker_id}"}
    ):
        with contextlib.suppress(Exception):
            docker_client.api.remove_container(container["Id"], force=True, v=True)


def test_build_executes_remotely_then_comes_from_the_action_cache(
    bazel: Bazel, start_worker: Callable[..., Any]
) -> None:
    """Bazel gets byte-exact outputs from the worker, and a rebuild after clean runs nothing again."""
    worker = start_worker()
    engine = worker.server.worker.engine
    flags = remote_flags(worker.target)

    cold = bazel("build", *flags)
    assert engine.admitted_total == ACTIONS
    assert cold.processes().get("remote") == ACTIONS, cold.output[-2000:]
    assert bazel.outputs() == EXPECTED
    host_init = Path("/proc/1/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    assert bazel.where()[1] == host_init, "the action saw this machine's processes, no container"

    bazel("clean")
    cached = bazel("build", *flags)
    assert engine.admitted_total == ACTIONS, "a cached action was executed again"
    counts = cached.processes()
    assert counts.get("remote cache hit") == ACTIONS, cached.output[-2000:]
    assert "remote" not in counts, cached.output[-2000:]
    assert bazel.outputs() == EXPECTED


@pytest.mark.docker
def test_container_image_property_runs_every_action_in_docker(
    bazel: Bazel, docker_worker: Any, busybox_image: str
) -> None:
    """container-image=docker://IMAGE moves every action into a container of IMAGE, outputs unchanged."""
    engine = docker_worker.server.worker.engine
    flags = remote_flags(
        docker_worker.target,
        # The image has busybox's sh but no bash, the shell genrules use by default.
        "--shell_executable=/bin/sh",
        f"--remote_default_exec_properties=container-image=docker://{busybox_image}",
    )

    run = bazel("build", *flags)
    assert engine.admitted_total == ACTIONS
    assert run.processes().get("remote") == ACTIONS, run.output[-2000:]
    assert bazel.outputs() == EXPECTED
    uid, init = bazel.where()
    assert uid == CONTAINER_USER, "the action ran as the Docker executor's user"
    assert init[0].endswith(b"docker-init"), f"process 1 was {init!r}, not the container's init"
    assert any(b"where.txt" in arg for arg in init), "the container's init ran this very action"
