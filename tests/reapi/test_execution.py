"""REAPI Execute and WaitExecution against the whole worker: both front doors on one port, real actions."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import grpc
import pytest
from google.longrunning import operations_pb2
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc

ENV = [re_pb.Command.EnvironmentVariable(name="PATH", value="/usr/bin:/bin")]


def blob(data: bytes) -> tuple[re_pb.Digest, bytes]:
    import hashlib

    return re_pb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data)), data


class Client:
    """A tiny REAPI client: uploads what an action needs and runs it."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.cas = re_grpc.ContentAddressableStorageStub(channel)
        self.execution = re_grpc.ExecutionStub(channel)
        self.cache = re_grpc.ActionCacheStub(channel)

    def upload(self, blobs: Iterable[tuple[re_pb.Digest, bytes]]) -> None:
        request = re_pb.BatchUpdateBlobsRequest()
        for digest, data in blobs:
            request.requests.add(digest=digest, data=data)
        response = self.cas.BatchUpdateBlobs(request, timeout=30)
        assert all(r.status.code == code_pb2.OK for r in response.responses)

    def action(
        self,
        argv: list[str],
        *,
        inputs: re_pb.Directory | None = None,
        extra: Iterable[tuple[re_pb.Digest, bytes]] = (),
        upload: bool = True,
        **command_fields: object,
    ) -> re_pb.Digest:
        command = re_pb.Command(arguments=argv, environment_variables=ENV, **command_fields)  # type: ignore[arg-type]
        command_blob = blob(command.SerializeToString(deterministic=True))
        root_blob = blob((inputs or re_pb.Directory()).SerializeToString(deterministic=True))
        action = re_pb.Action(command_digest=command_blob[0], input_root_digest=root_blob[0])
        action_blob = blob(action.SerializeToString(deterministic=True))
        if upload:
            self.upload([command_blob, root_blob, action_blob, *extra])
        return action_blob[0]

    def execute(
        self, digest: re_pb.Digest, **kwargs: object
    ) -> tuple[list[operations_pb2.Operation], re_pb.ExecuteResponse]:
        ops = list(self.execution.Execute(re_pb.ExecuteRequest(action_digest=digest, **kwargs), timeout=60))  # type: ignore[arg-type]
        return ops, response_of(ops[-1])

    def read(self, digest: re_pb.Digest) -> bytes:
        response = self.cas.BatchReadBlobs(re_pb.BatchReadBlobsRequest(digests=[digest]), timeout=30)
        assert response.responses[0].status.code == code_pb2.OK
        return response.responses[0].data


def response_of(operation: operations_pb2.Operation) -> re_pb.ExecuteResponse:
    assert operation.done
    response = re_pb.ExecuteResponse()
    assert operation.response.Unpack(response)
    return response


@pytest.fixture
def client(worker) -> Client:
    return Client(grpc.insecure_channel(worker.target))


def test_execute_runs_and_reports_outputs_logs_and_stages(client):
    """The result has the exit code, logs as blobs, files, a Tree per directory; stages come in order."""
    source = blob(b"input bytes\n")
    inputs = re_pb.Directory(files=[re_pb.FileNode(name="in.txt", digest=source[0])])
    digest = client.action(
        [
            "/bin/sh",
            "-c",
            "cat in.txt > out.txt; mkdir -p d/e; echo x > d/e/f; ln -s out.txt d/link; echo err >&2; exit 3",
        ],
        inputs=inputs,
        extra=[source],
        output_files=["out.txt"],
        output_directories=["d"],
    )
    ops, response = client.execute(digest)
    stages = []
    for op in ops:
        meta = re_pb.ExecuteOperationMetadata()
        op.metadata.Unpack(meta)
        stages.append(meta.stage)
        assert meta.action_digest == digest
    assert stages[-1] == re_pb.ExecutionStage.COMPLETED
    assert stages == sorted(stages)
    assert response.status.code == code_pb2.OK and not response.cached_result
    result = response.result
    assert result.exit_code == 3
    assert client.read(result.stderr_digest) == b"err\n"
    assert [f.path for f in result.output_files] == ["out.txt"]
    assert client.read(result.output_files[0].digest) == b"input bytes\n"
    tree = re_pb.Tree()
    tree.ParseFromString(client.read(result.output_directories[0].tree_digest))
    assert result.output_directories[0].path == "d"
    assert [d.name for d in tree.root.directories] == ["e"] and [s.name for s in tree.root.symlinks] == [
        "link"
    ]
    assert [f.name for f in tree.children[0].files] == ["f"]
    meta = result.execution_metadata
    assert meta.worker and meta.queued_timestamp.seconds > 0
    assert (
        meta.execution_start_timestamp.ToNanoseconds() <= meta.execution_completed_timestamp.ToNanoseconds()
    )


def test_a_successful_result_is_cached_and_served_from_the_cache(client, worker):
    """Exit code 0 goes into the action cache; the next Execute answers from it and runs nothing."""
    digest = client.action(["/bin/sh", "-c", "echo hi > o"], output_files=["o"])
    _, first = client.execute(digest)
    assert first.result.exit_code == 0 and not first.cached_result
    ran = worker.server.worker.engine.admitted_total
    _, second = client.execute(digest)
    assert (
        second.cached_result and second.result.output_files[0].digest == first.result.output_files[0].digest
    )
    assert worker.server.worker.engine.admitted_total == ran
    cached = client.cache.GetActionResult(re_pb.GetActionResultRequest(action_digest=digest), timeout=10)
    assert cached.exit_code == 0
    _, third = client.execute(digest, skip_cache_lookup=True)
    assert not third.cached_result and worker.server.worker.engine.admitted_total == ran + 1


def test_a_failure_is_not_cached(client):
    """A non-zero exit is a result but never a cache entry."""
    digest = client.action(["/bin/sh", "-c", "exit 1"])
    client.execute(digest)
    with pytest.raises(grpc.RpcError) as info:
        client.cache.GetActionResult(re_pb.GetActionResultRequest(action_digest=digest), timeout=10)
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_missing_input_blob_is_failed_precondition_listing_exactly_the_missing_digests(client):
    """Clients re-upload what the MISSING violations name: exactly the absent blobs, nothing else."""
    present, absent1, absent2 = blob(b"present"), blob(b"absent one"), blob(b"absent two")
    inputs = re_pb.Directory(
        files=[
            re_pb.FileNode(name="a", digest=absent1[0]),
            re_pb.FileNode(name="b", digest=present[0]),
            re_pb.FileNode(name="c", digest=absent2[0]),
        ]
    )
    digest = client.action(["/bin/true"], inputs=inputs, extra=[present])
    with pytest.raises(grpc.RpcError) as info:
        client.execute(digest)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(info.value)
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    subjects = {v.subject for v in failure.violations}
    assert {v.type for v in failure.violations} == {"MISSING"}
    assert subjects == {f"blobs/{d.hash}/{d.size_bytes}" for d in (absent1[0], absent2[0])}


def test_missing_action_blob_is_named(client):
    """An Action that was never uploaded is FAILED_PRECONDITION naming its digest."""
    digest = client.action(["/bin/true"], upload=False)
    with pytest.raises(grpc.RpcError) as info:
        client.execute(digest)
    status = rpc_status.from_call(info.value)
    failure = error_details_pb2.PreconditionFailure()
    status.details[0].Unpack(failure)
    assert [v.subject for v in failure.violations] == [f"blobs/{digest.hash}/{digest.size_bytes}"]


def test_unknown_platform_property_is_refused_naming_it(client):
    """A worker that silently ignores a platform it cannot give runs actions where they should not run."""
    command = re_pb.Command(arguments=["/bin/true"])
    command_blob = blob(command.SerializeToString())
    root_blob = blob(b"")
    action = re_pb.Action(
        command_digest=command_blob[0],
        input_root_digest=root_blob[0],
        platform=re_pb.Platform(properties=[re_pb.Platform.Property(name="gpu", value="a100")]),
    )
    action_blob = blob(action.SerializeToString())
    client.upload([command_blob, action_blob])
    with pytest.raises(grpc.RpcError) as info:
        client.execute(action_blob[0])
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "'gpu'" in info.value.details()


def test_timeout_is_deadline_exceeded_with_the_partial_result(client):
    """The spec's way to report a timeout: DEADLINE_EXCEEDED in the response, logs so far in the result."""
    command = re_pb.Command(arguments=["/bin/sh", "-c", "echo started; sleep 30"], environment_variables=ENV)
    command_blob = blob(command.SerializeToString())
    root_blob = blob(b"")
    action = re_pb.Action(command_digest=command_blob[0], input_root_digest=root_blob[0])
    action.timeout.FromSeconds(1)
    action_blob = blob(action.SerializeToString())
    client.upload([command_blob, action_blob])
    _, response = client.execute(action_blob[0])
    assert response.status.code == code_pb2.DEADLINE_EXCEEDED
    assert client.read(response.result.stdout_digest) == b"started\n"


def test_wait_execution_after_the_stream_dropped_returns_the_same_result(client):
    """The action outlives its stream; WaitExecution re-attaches by the operation's name."""
    digest = client.action(["/bin/sh", "-c", "sleep 1; echo done > o"], output_files=["o"])
    stream = client.execution.Execute(re_pb.ExecuteRequest(action_digest=digest), timeout=60)
    first = next(stream)
    stream.cancel()
    assert not first.done and first.name
    ops = list(client.execution.WaitExecution(re_pb.WaitExecutionRequest(name=first.name), timeout=60))
    response = response_of(ops[-1])
    assert response.result.exit_code == 0
    assert client.read(response.result.output_files[0].digest) == b"done\n"


def test_identical_actions_in_flight_run_once(client, worker):
    """Two identical actions at once execute once; both callers get the one result."""
    digest = client.action(["/bin/sh", "-c", "sleep 1; date +%s%N > o"], output_files=["o"])
    before = worker.server.worker.engine.admitted_total
    responses: list[re_pb.ExecuteResponse] = []
    threads = [threading.Thread(target=lambda: responses.append(client.execute(digest)[1])) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join(60)
    assert worker.server.worker.engine.admitted_total == before + 1
    assert responses[0].result.output_files[0].digest == responses[1].result.output_files[0].digest


def test_wait_execution_of_an_unknown_operation_is_not_found(client):
    """A name the worker never gave (or forgot) is NOT_FOUND, not a hang."""
    with pytest.raises(grpc.RpcError) as info:
        list(client.execution.WaitExecution(re_pb.WaitExecutionRequest(name="operations/nope"), timeout=10))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_own_api_and_reapi_share_one_port_and_one_store(worker):
    """One endpoint: a blob uploaded through the own API is visible to REAPI clients."""
    channel = grpc.insecure_channel(worker.target)
    data = b"shared"
    digest, _ = blob(data)
    own = pb_grpc.WorkerServiceStub(channel)
    own.UploadBlobs(
        iter([pb.UploadBlobsRequest(digest=pb.Digest(sha256=digest.hash, size_bytes=len(data)), data=data)]),
        timeout=10,
    )
    missing = re_grpc.ContentAddressableStorageStub(channel).FindMissingBlobs(
        re_pb.FindMissingBlobsRequest(blob_digests=[digest]), timeout=10
    )
    assert list(missing.missing_blob_digests) == []
