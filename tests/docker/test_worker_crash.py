"""A worker SIGKILLed mid-action and restarted leaves no container behind (the whole process, via the CLI)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from _dockerkit import labelled_containers, new_worker_id, remove_labelled
from _support import BASE_ENV, wait_until

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc

pytestmark = pytest.mark.docker


class WorkerProcess:
    """``expbuild-worker serve`` as a child process on 127.0.0.1 and a port it picked itself."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "expbuild_worker", "serve", "--config", str(config), "--port", "0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if "listening on" not in line:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the worker did not start: {line!r}")
        self.target = line.rsplit(" ", 1)[1].strip()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def crash_config(tmp_path: Path, busybox_image: str, docker_client: Any) -> Iterator[tuple[Path, str]]:
    """A Docker worker config in tmp_path with a worker id of its own; its containers removed afterwards."""
    worker_id = new_worker_id()
    config = tmp_path / "worker.toml"
    config.write_text(
        f"""
[server]
address = "127.0.0.1"
worker_id = "{worker_id}"
shutdown_grace_seconds = 0.0

[execution]
work_root = "{tmp_path / "work"}"

[executor.docker]
type = "docker"
image = "{busybox_image}"
orphan_sweep_interval_seconds = 600
"""
    )
    yield config, worker_id
    remove_labelled(docker_client, worker_id)


def test_sigkill_mid_action_then_restart_leaves_no_container(
    crash_config: tuple[Path, str], docker_client: Any
) -> None:
    """SIGKILL strands the running container; the restarted worker (same id) removes it within seconds."""
    config, worker_id = crash_config
    worker = WorkerProcess(config)
    try:
        with grpc.insecure_channel(worker.target) as channel:
            stream = pb_grpc.WorkerServiceStub(channel).Execute(
                pb.ExecuteRequest(argv=["sleep", "600"], environment=BASE_ENV), timeout=60
            )
            for response in stream:
                if response.WhichOneof("event") == "started":
                    break
            assert wait_until(lambda: labelled_containers(docker_client, worker_id), 10)
            os.kill(worker.proc.pid, signal.SIGKILL)
            worker.proc.wait(10)
            stream.cancel()
    finally:
        worker.stop()
    stranded = labelled_containers(docker_client, worker_id)
    assert len(stranded) == 1 and stranded[0]["State"] == "running", "SIGKILL gave no chance to clean up"

    restarted = WorkerProcess(config)
    try:
        assert wait_until(lambda: not labelled_containers(docker_client, worker_id), 5)
    finally:
        restarted.stop()
