"""Outputs copied out of containers (archive I/O) on a real Docker daemon: caps hold and results arrive."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import LABEL_WORKER, new_worker_id, remove_labelled
from _support import execute, request

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.errors import OutputLimitExceeded
from expbuild_worker.execution.docker._archive import unpack_output

pytestmark = pytest.mark.docker

SH = "/bin/sh"


@pytest.fixture
def archive_worker(start_worker: Callable[..., Any], busybox_image: str, docker_client: Any) -> Iterator[Any]:
    """Factory: a worker whose default executor is Docker with archive I/O, and ``execution`` settings."""
    worker_ids: list[str] = []

    def factory(**execution: Any) -> Any:
        worker_id = new_worker_id()
        worker_ids.append(worker_id)
        return start_worker(
            {
                "server": {"worker_id": worker_id},
                "execution": {"default_executor": "docker", **execution},
                "executor": {
                    "docker": {
                        "type": "docker",
                        "image": busybox_image,
                        "io_mode": "archive",
                        "orphan_sweep_interval_seconds": 0,
                    }
                },
            }
        )

    yield factory
    for worker_id in worker_ids:
        remove_labelled(docker_client, worker_id)


def _bytes_written_by_this_process() -> int:
    """Bytes this process has passed to write calls so far (the kernel's count, all threads)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no wchar line")


def test_a_sparse_output_past_the_cap_never_reaches_the_disk(
    docker_client: Any, busybox_image: str, tmp_path: Path
) -> None:
    """A 256 MiB sparse file under a 1 MiB cap is refused from the daemon's archive header:
    the worker writes next to nothing and keeps nothing of the output (`truncate -s 1T` must not
    fill its disk)."""
    worker_id = new_worker_id()
    api = docker_client.api
    try:
        container = api.create_container(
            busybox_image,
            command=[SH, "-c", "mkdir /out && echo small > /out/a && truncate -s 256M /out/big"],
            labels={LABEL_WORKER: worker_id},
        )
        api.start(container)
        assert api.wait(container, timeout=60)["StatusCode"] == 0
        chunks, _ = api.get_archive(container, "/out")
        before = _bytes_written_by_this_process()
        with pytest.raises(OutputLimitExceeded, match="max_output_bytes"):
            unpack_output(chunks, root=tmp_path, output_path="out", max_bytes=1 << 20)
        assert _bytes_written_by_this_process() - before < 8 << 20
        assert list(tmp_path.iterdir()) == []
    finally:
        remove_labelled(docker_client, worker_id)


def test_an_output_over_the_cap_keeps_the_exit_code(archive_worker: Any) -> None:
    """An output past execution.max_output_bytes ends OUTPUT_LIMIT_EXCEEDED with the command's
    exit code, and no output is delivered cut short."""
    worker = archive_worker(max_output_bytes=1 << 20)
    script = "mkdir out && echo ok > out/small && truncate -s 64M out/big; exit 3"
    run = execute(worker.stub(), request([SH, "-c", script], output_directories=["out"]))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED, run.result.message
    assert run.result.exit_code == 3 and "max_output_bytes" in run.result.message
    assert list(run.result.output_files) == [] and run.outputs == {}


def test_overlapping_outputs_count_once_against_the_cap(archive_worker: Any) -> None:
    """3.5 KB of outputs, some named twice or nested in another output, fit a 4 KB cap and each
    path arrives once."""
    worker = archive_worker(max_output_bytes=4000)
    script = "mkdir -p out/sub && head -c 2500 /dev/zero > out/f && head -c 1000 /dev/zero > out/sub/g"
    run = execute(
        worker.stub(),
        request(
            [SH, "-c", script],
            output_files=["out/f", "out/f", "out/sub/g"],
            output_directories=["out/sub", "out"],
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED, run.result.message
    assert [f.path for f in run.result.output_files] == ["out/f", "out/sub/g"]
    assert [d.path for d in run.result.output_directories] == ["out", "out/sub"]
    assert bytes(run.outputs["out/f"]) == b"\0" * 2500


def test_symlinks_with_long_targets_that_would_not_fit_a_result_are_an_output_limit(
    archive_worker: Any,
) -> None:
    """1,100 symlinks with 4 KB targets make a result over a client's default 4 MiB: the action
    ends OUTPUT_LIMIT_EXCEEDED with its exit code, not a stream broken by RESOURCE_EXHAUSTED."""
    worker = archive_worker()
    script = (
        "mkdir out && t=$(head -c 4000 /dev/zero | tr '\\0' t) && "
        'for i in $(seq 1100); do ln -s "$t" out/$i || exit 1; done; exit 5'
    )
    run = execute(worker.stub(), request([SH, "-c", script], output_directories=["out"]))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED, run.result.message
    assert run.result.exit_code == 5 and "pack large trees into one file" in run.result.message


def test_the_executor_stops_reading_an_output_archive_at_the_cap(archive_worker: Any) -> None:
    """The executor hands the cap to the archive reader: a 200 MiB sparse output under a 1 MiB
    cap is refused from its header, with the exit code kept, and never reaches the worker's disk
    (the work directory of an archive-mode container cannot hold a terabyte here)."""
    worker = archive_worker(max_output_bytes=1 << 20)
    before = _bytes_written_by_this_process()
    script = "mkdir out && truncate -s 200M out/huge; exit 5"
    run = execute(worker.stub(), request([SH, "-c", script], output_directories=["out"]), timeout=120)
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED, run.result.message
    assert run.result.exit_code == 5
    assert _bytes_written_by_this_process() - before < 16 << 20
