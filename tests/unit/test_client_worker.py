"""WorkerClient against a real worker: blobs go up once, runs stream, outputs land, abandoning cancels."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from _support import BASE_ENV, wait_gone

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.client import (
    UPLOAD_CHUNK_BYTES,
    InputSpec,
    OutputWriter,
    WorkerClient,
    collect_inputs,
)
from expbuild_worker.model import Digest


@pytest.fixture
def client(worker_target: str) -> Iterator[WorkerClient]:
    with WorkerClient(worker_target) as c:
        yield c


def _request(script: str, **kwargs: object) -> pb.ExecuteRequest:
    return pb.ExecuteRequest(argv=["/bin/sh", "-c", script], environment=BASE_ENV, **kwargs)  # type: ignore[arg-type]


def test_blob_uploaded_once_serves_two_actions(client: WorkerClient, tmp_path: Path) -> None:
    """A multi-piece input goes up once; the next action finds it in the store and reuses it."""
    data = os.urandom(2 * UPLOAD_CHUNK_BYTES + 5)
    (tmp_path / "in.bin").write_bytes(data)
    tree = collect_inputs([InputSpec(tmp_path / "in.bin", "in.bin")])
    assert client.upload_inputs(tree) == [Digest.of_bytes(data)]
    assert client.upload_inputs(tree) == []
    for _ in range(2):
        request = _request("sha256sum in.bin")
        tree.add_to(request)
        out = bytearray()
        result = client.run(request, stdout=out.extend)
        assert result.status == pb.EXECUTION_STATUS_COMPLETED and result.exit_code == 0
        assert out.decode().split()[0] == hashlib.sha256(data).hexdigest()


def test_unknown_digest_is_missing_and_unreadable(client: WorkerClient) -> None:
    """The store answers honestly about what it lacks; reading it is NOT_FOUND."""
    digest = Digest.of_bytes(b"never uploaded " + os.urandom(8))
    assert client.find_missing_blobs([digest]) == [digest]
    with pytest.raises(grpc.RpcError) as err:
        list(client.read_blob(pb.Digest(sha256=digest.sha256, size_bytes=digest.size)))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_run_streams_logs_and_writes_outputs(client: WorkerClient, tmp_path: Path) -> None:
    """run() hands each stream its own bytes and writes verified outputs under the destination."""
    out, err = bytearray(), bytearray()
    request = _request(
        "printf o1; printf e1 >&2; mkdir -p d/e; printf x > d/e/f; chmod +x d/e/f; printf o2",
        output_directories=["d"],
    )
    result = client.run(
        request, stdout=out.extend, stderr=err.extend, outputs=OutputWriter(destination=tmp_path)
    )
    assert (bytes(out), bytes(err)) == (b"o1o2", b"e1")
    assert result.stdout.size_bytes == 4
    assert (tmp_path / "d/e/f").read_bytes() == b"x"
    assert os.access(tmp_path / "d/e/f", os.X_OK)


def test_omitted_output_contents_come_through_read_blob(client: WorkerClient, tmp_path: Path) -> None:
    """With omit_output_contents the writer fetches each file by digest, byte-exact."""
    request = _request("head -c 3000000 /dev/urandom > big; : > empty", output_files=["big", "empty"])
    request.omit_output_contents = True
    result = client.run(request, outputs=OutputWriter(destination=tmp_path))
    big = next(f for f in result.output_files if f.path == "big")
    assert hashlib.sha256((tmp_path / "big").read_bytes()).hexdigest() == big.digest.sha256
    assert (tmp_path / "empty").read_bytes() == b""


def test_leaving_an_execution_early_cancels_it(client: WorkerClient) -> None:
    """A client that stops reading (exception, break) gets the remote action killed."""
    logs = bytearray()
    with client.execute(_request("echo $$; exec sleep 600")) as execution:
        for event in execution:
            if event.WhichOneof("event") == "log":
                logs.extend(event.log.data)
                if logs.endswith(b"\n"):
                    break
    assert execution.execution_id
    assert wait_gone(int(logs), timeout=10)


def test_cancel_execution_by_id_ends_with_cancelled(client: WorkerClient) -> None:
    """CancelExecution by id ends the stream with a CANCELLED result, not an RPC error."""
    statuses = []
    with client.execute(_request("echo started; exec sleep 600")) as execution:
        for event in execution:
            kind = event.WhichOneof("event")
            if kind == "log" and not statuses:
                assert client.cancel_execution(execution.execution_id) is True
                statuses.append(-1)
            elif kind == "result":
                statuses.append(event.result.status)
    assert statuses == [-1, pb.EXECUTION_STATUS_CANCELLED]
