"""Another worker, an evicting store, a self-destroying action or slow staging never cost a result."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest
from _support import execute, request

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.composition import work_root_of
from expbuild_worker.config import parse_config
from expbuild_worker.errors import UnavailableError
from expbuild_worker.model import Digest

SH = "/bin/sh"


def _upload(stub, data: bytes) -> pb.Digest:
    digest = Digest.of_bytes(data)
    wire = pb.Digest(sha256=digest.sha256, size_bytes=digest.size)
    stub.UploadBlobs(iter([pb.UploadBlobsRequest(digest=wire, offset=0, data=data)]), timeout=30)
    return wire


def test_second_worker_on_the_same_work_root_is_refused_and_the_first_keeps_running(start_worker, tmp_path):
    """A second worker must never sweep a live worker's directories: it refuses to start, naming the key."""
    first = start_worker({"execution": {"work_root": str(tmp_path / "shared")}})
    stub = first.stub()
    req = request([SH, "-c", "sleep 1; echo done > out.txt"], output_files=["out.txt"])
    results: list[object] = []
    runner = threading.Thread(target=lambda: results.append(execute(stub, req)))
    runner.start()
    time.sleep(0.3)  # the action is running
    with pytest.raises(UnavailableError, match=r"in use by another worker.*execution\.work_root"):
        start_worker({"execution": {"work_root": str(tmp_path / "shared")}})
    runner.join(30)
    run = results[0]
    assert run.status == pb.EXECUTION_STATUS_COMPLETED  # type: ignore[attr-defined]
    assert bytes(run.outputs["out.txt"]) == b"done\n"  # type: ignore[attr-defined]
    # and the refused worker left nothing that would stop a later, legitimate one
    first.stop()
    second = start_worker({"execution": {"work_root": str(tmp_path / "shared")}})
    assert execute(second.stub(), request(["/bin/true"])).status == pb.EXECUTION_STATUS_COMPLETED


def test_a_separate_store_path_is_claimed_too(start_worker, tmp_path):
    """Two workers with their own work roots but one store path would evict each other's blobs."""
    start_worker(
        {"execution": {"work_root": str(tmp_path / "a")}, "storage": {"path": str(tmp_path / "cas")}}
    )
    with pytest.raises(UnavailableError, match=r"store .* in use by another worker.*storage\.path"):
        start_worker(
            {"execution": {"work_root": str(tmp_path / "b")}, "storage": {"path": str(tmp_path / "cas")}}
        )


def test_default_work_root_is_per_worker_id():
    """Two workers with different ids and no work_root configured must not collide by default."""
    a = parse_config({"server": {"worker_id": "builder-a"}})
    b = parse_config({"server": {"worker_id": "builder-b"}})
    hostile = parse_config({"server": {"worker_id": "../../etc"}})
    assert work_root_of(a) != work_root_of(b)
    assert work_root_of(a).name == "builder-a"
    assert work_root_of(hostile).parent == work_root_of(a).parent  # never climbs out


def test_action_that_deletes_its_own_directory_still_reports_its_exit_code(stub):
    """Collection failures are part of the result; the exit code the command produced is never hidden."""
    run = execute(
        stub,
        request([SH, "-c", 'rm -rf "$PWD"; exit 7'], output_files=["out.txt"], output_directories=["d"]),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert run.result.exit_code == 7
    assert list(run.result.output_files) == []


def test_outputs_are_never_evicted_before_they_are_streamed(start_worker):
    """A small store under pressure from concurrent large outputs loses no listed output."""
    worker = start_worker({"storage": {"max_bytes": 6 << 20}, "execution": {"max_concurrent_executions": 4}})
    script = "head -c 2000000 /dev/urandom > big; sleep 0.5"
    runs: list[object] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            runs.append(execute(worker.stub(), request([SH, "-c", script], output_files=["big"])))
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    # Every action either got its whole output or was told the store was full: never NOT_FOUND
    # after a result listed the file.
    assert not [e for e in errors if getattr(e, "code", lambda: None)() is grpc.StatusCode.NOT_FOUND]
    for run in runs:
        for f in run.result.output_files:  # type: ignore[attr-defined]
            assert len(run.outputs[f.path]) == f.digest.size_bytes  # type: ignore[attr-defined]
    assert any(run.result.output_files for run in runs)  # type: ignore[attr-defined]


def test_outputs_omitted_from_the_stream_stay_readable(start_worker):
    """With omit_output_contents the result lists blobs the client reads later: they are kept meanwhile."""
    worker = start_worker({"storage": {"max_bytes": 4 << 20}})
    stub = worker.stub()
    first = execute(
        stub,
        request(
            [SH, "-c", "head -c 1500000 /dev/urandom > o"], output_files=["o"], omit_output_contents=True
        ),
    )
    listed = first.result.output_files[0].digest
    for _ in range(4):  # pressure that would evict an unpinned blob
        execute(stub, request([SH, "-c", "head -c 1500000 /dev/urandom > o"], output_files=["o"]))
    data = b"".join(r.data for r in stub.ReadBlob(pb.ReadBlobRequest(digest=listed), timeout=30))
    assert len(data) == listed.size_bytes


def test_missing_input_is_refused_naming_the_digest(stub):
    """A blob the store lacks is FAILED_PRECONDITION naming field and digest, before 'accepted'."""
    absent = pb.Digest(sha256="ab" * 32, size_bytes=5)
    req = request(["/bin/true"], input_files=[pb.InputFile(path="in", digest=absent)])
    with pytest.raises(grpc.RpcError) as info:
        execute(stub, req)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "input_files[0].digest" in info.value.details() and "ab" * 32 in info.value.details()


def test_queued_action_keeps_its_inputs_while_others_fill_the_store(start_worker):
    """Inputs are pinned from admission: a queued action never finds them evicted when its turn comes."""
    worker = start_worker({"storage": {"max_bytes": 4 << 20}, "execution": {"max_concurrent_executions": 1}})
    stub = worker.stub()
    payload = os.urandom(1_000_000)
    digest = _upload(stub, payload)
    blocker = threading.Thread(target=lambda: execute(stub, request([SH, "-c", "sleep 1.5"])))
    blocker.start()
    time.sleep(0.3)
    results: list[object] = []
    queued = threading.Thread(
        target=lambda: results.append(
            execute(
                stub,
                request(
                    [SH, "-c", "sha256sum in | cut -d' ' -f1"],
                    input_files=[pb.InputFile(path="in", digest=digest)],
                ),
            )
        )
    )
    queued.start()
    time.sleep(0.3)
    for _ in range(5):  # fill the store well past its bound while the action waits
        _upload(stub, os.urandom(1_000_000))
    blocker.join(30)
    queued.join(30)
    run = results[0]
    assert run.status == pb.EXECUTION_STATUS_COMPLETED  # type: ignore[attr-defined]
    assert bytes(run.stdout).strip().decode() == digest.sha256  # type: ignore[attr-defined]


def test_cancel_stops_staging_of_many_entries_promptly(start_worker):
    """A cancel during staging takes effect at the next entry, not after the last of 100k."""
    worker = start_worker({"server": {"max_request_bytes": 64 << 20}})
    stub = worker.stub()
    dirs = [pb.InputDirectory(path=f"d{i // 100}/e{i}") for i in range(100_000)]
    req = request(["/bin/true"], execution_id="staging-cancel", input_directories=dirs)
    stream = stub.Execute(req, timeout=120)
    first = next(stream)
    assert first.WhichOneof("event") == "accepted"
    time.sleep(0.5)
    cancelled_at = time.monotonic()
    stub.CancelExecution(pb.CancelExecutionRequest(execution_id="staging-cancel"), timeout=10)
    result = next(r for r in stream if r.WhichOneof("event") == "result").result
    print(f"cancel took effect after {time.monotonic() - cancelled_at:.2f}s")
    assert result.status == pb.EXECUTION_STATUS_CANCELLED
    assert not result.stats.HasField("inputs_staged_time"), "staging ran to its end despite the cancel"


def test_staging_deadline_ends_slow_staging(start_worker):
    """execution.staging_timeout_seconds bounds how long inputs may take to stage."""
    worker = start_worker(
        {"server": {"max_request_bytes": 64 << 20}, "execution": {"staging_timeout_seconds": 0.2}}
    )
    dirs = [pb.InputDirectory(path=f"d{i // 100}/e{i}") for i in range(100_000)]
    run = execute(worker.stub(), request(["/bin/true"], input_directories=dirs), timeout=120)
    assert run.status == pb.EXECUTION_STATUS_TIMED_OUT
    assert "execution.staging_timeout_seconds" in run.result.message


def test_lock_file_names_the_holder(tmp_path):
    """The refusal names the live holder so an operator knows which worker to look at."""
    from expbuild_worker.engine import DirectoryLock

    held = DirectoryLock(Path(tmp_path), what="work root", config_key="execution.work_root")
    try:
        with pytest.raises(UnavailableError, match=rf"pid {os.getpid()}"):
            DirectoryLock(Path(tmp_path), what="work root", config_key="execution.work_root")
    finally:
        held.release()
    DirectoryLock(Path(tmp_path), what="work root", config_key="execution.work_root").release()


def test_two_live_workers_with_one_id_are_refused_even_with_separate_work_roots(start_worker, tmp_path):
    """Cgroups and containers are named by the worker id: a second worker with it would remove the first's."""
    start_worker({"server": {"worker_id": "twin"}, "execution": {"work_root": str(tmp_path / "a")}})
    with pytest.raises(UnavailableError, match=r"worker id 'twin' on this host is in use.*server\.worker_id"):
        start_worker({"server": {"worker_id": "twin"}, "execution": {"work_root": str(tmp_path / "b")}})
