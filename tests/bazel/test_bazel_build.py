"""A real Bazel builds a genrule workspace through the worker's Remote Execution API."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Bazel

pytestmark = pytest.mark.timeout(900)

EXPECTED = {
    "hello.txt": b"hello from a genrule\n",
    "upper.txt": b"HELLO FROM A GENRULE\n",
    "tool.sh": b'#!/bin/sh\necho "tool read: $(cat "$1")"\n',
    "tool_out.txt": b"tool read: HELLO FROM A GENRULE\n",
    "nested/a/one.txt": b"one\n",
    "nested/b/c/two.bin": b"two\x00\xff\n",
}
"""Every output of the workspace but where.txt, byte for byte, wherever it was built."""
ACTIONS = 7
"""Spawns of one full build: six genrules, and :tool twice (as a target and as a tool)."""
CONTAINER_USER = 65534


def remote_flags(target: str, *extra: str) -> list[str]:
    """The flags a user puts in .bazelrc to build through the worker (see docs/reapi.md)."""
    return [
        f"--remote_executor=grpc://{target}",
        "--spawn_strategy=remote",
        "--genrule_strategy=remote",
        "--noremote_local_fallback",
        "--disk_cache=",
        # Actions get a fixed PATH, not the test runner's: the same action digest everywhere.
        "--incompatible_strict_action_env",
        *extra,
        "//...",
    ]


def where(bazel: Bazel) -> tuple[int, list[bytes]]:
    """The user id where.txt's action ran as, and the argv of process 1 where it ran."""
    uid, _, cmdline = bazel.output("where.txt").partition(b"\n")
    return int(uid), cmdline.rstrip(b"\0").split(b"\0")


def assert_outputs(bazel: Bazel) -> None:
    got = {path: bazel.output(path) for path in EXPECTED}
    assert got == EXPECTED


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
    assert_outputs(bazel)
    assert where(bazel)[0] == bazel.uid_of_host

    bazel("clean")
    cached = bazel("build", *flags)
    assert engine.admitted_total == ACTIONS, "a cached action was executed again"
    counts = cached.processes()
    assert counts.get("remote cache hit") == ACTIONS, cached.output[-2000:]
    assert "remote" not in counts, cached.output[-2000:]
    assert_outputs(bazel)


@pytest.mark.docker
def test_container_image_property_runs_every_action_in_docker(bazel: Bazel, docker_worker: Any) -> None:
    """container-image=docker://IMAGE moves every action into a container of IMAGE, outputs unchanged."""
    engine = docker_worker.server.worker.engine
    # The image has busybox's sh but no bash, the shell genrules use by default.
    flags = remote_flags(
        docker_worker.target,
        "--shell_executable=/bin/sh",
        f"--remote_default_exec_properties=container-image=docker://{docker_worker_image(docker_worker)}",
    )

    run = bazel("build", *flags)
    assert engine.admitted_total == ACTIONS
    assert run.processes().get("remote") == ACTIONS, run.output[-2000:]
    assert_outputs(bazel)
    uid, init = where(bazel)
    assert uid == CONTAINER_USER
    assert init[0].endswith(b"docker-init"), init


def docker_worker_image(worker: Any) -> str:
    """The image the worker's Docker executor runs by default (the one built for these tests)."""
    image: str = worker.config.executors["docker"].image
    return image
