"""The generated REAPI modules: importable beside Google's shared protos, and wire-compatible with clients."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from google.longrunning import operations_pb2
from google.protobuf import any_pb2, descriptor_pool, duration_pb2, timestamp_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from expbuild_worker.api.reapi import bytestream_pb2 as bs
from expbuild_worker.api.reapi import bytestream_pb2_grpc as bs_grpc
from expbuild_worker.api.reapi import remote_execution_pb2 as re
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.api.reapi import semver_pb2 as semver
from expbuild_worker.api.v1 import worker_pb2, worker_pb2_grpc


def test_all_modules_share_one_descriptor_pool() -> None:
    """Ours, googleapis-common-protos and grpc_status load in one process, each file registered once."""
    modules = (re, bs, semver, worker_pb2, operations_pb2, status_pb2, error_details_pb2, code_pb2)
    names = [module.DESCRIPTOR.name for module in modules]
    assert len(set(names)) == len(names)
    pool = descriptor_pool.Default()
    for module in modules:
        assert pool.FindFileByName(module.DESCRIPTOR.name) is module.DESCRIPTOR
    # Our file depends on the very descriptor googleapis-common-protos registered, not a copy.
    assert operations_pb2.DESCRIPTOR in re.DESCRIPTOR.dependencies
    assert status_pb2.DESCRIPTOR in re.DESCRIPTOR.dependencies
    # Our own API's stubs load in the same process too.
    assert worker_pb2_grpc.WorkerServiceStub is not None


def test_messages_live_in_our_package() -> None:
    """Classes name the module they are imported from, so they pickle and print where they live."""
    assert re.ActionResult.__module__ == "expbuild_worker.api.reapi.remote_execution_pb2"
    assert bs.ReadRequest.__module__ == "expbuild_worker.api.reapi.bytestream_pb2"


# Fields Bazel and other clients read or write on every build.
WIRE_FIELDS: list[tuple[type[Message], str, int]] = [
    (re.ActionResult, "output_files", 2),
    (re.ActionResult, "output_directories", 3),
    (re.ActionResult, "exit_code", 4),
    (re.ActionResult, "stdout_digest", 6),
    (re.ActionResult, "stderr_digest", 8),
    (re.ActionResult, "execution_metadata", 9),
    (re.ActionResult, "output_symlinks", 12),
    (re.Action, "command_digest", 1),
    (re.Action, "input_root_digest", 2),
    (re.Action, "timeout", 6),
    (re.Action, "do_not_cache", 7),
    (re.Action, "platform", 10),
    (re.Command, "arguments", 1),
    (re.Command, "environment_variables", 2),
    (re.Command, "working_directory", 6),
    (re.Command, "output_paths", 7),
    (re.Command, "output_directory_format", 9),
    (re.Digest, "hash", 1),
    (re.Digest, "size_bytes", 2),
    (re.ExecuteRequest, "skip_cache_lookup", 3),
    (re.ExecuteRequest, "action_digest", 6),
    (re.ExecuteRequest, "digest_function", 9),
    (re.ExecuteResponse, "status", 3),
    (re.ExecuteOperationMetadata, "stage", 1),
    (re.ExecutedActionMetadata, "virtual_execution_duration", 12),
    (re.OutputDirectory, "tree_digest", 3),
    (re.OutputDirectory, "root_directory_digest", 5),
    (re.FileNode, "is_executable", 4),
    (re.BatchUpdateBlobsRequest, "digest_function", 5),
    (re.BatchReadBlobsResponse.Response, "compressor", 4),
    (re.RequestMetadata, "tool_invocation_id", 3),
    (bs.ReadResponse, "data", 10),
    (bs.WriteRequest, "data", 10),
    (bs.WriteRequest, "finish_write", 3),
    (semver.SemVer, "prerelease", 4),
]


@pytest.mark.parametrize(
    ("message", "field", "number"),
    WIRE_FIELDS,
    ids=[f"{message.DESCRIPTOR.full_name}.{field}" for message, field, _ in WIRE_FIELDS],
)
def test_field_numbers_match_the_protocol(message: type[Message], field: str, number: int) -> None:
    """Clients encode by number: one wrong number silently corrupts every message Bazel exchanges."""
    assert message.DESCRIPTOR.fields_by_name[field].number == number


def test_services_have_the_protocol_method_paths() -> None:
    """gRPC routes by "/package.Service/Method", so the names are part of the wire."""
    methods = {
        f"/{service.full_name}/{method.name}"
        for module in (re, bs)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }
    assert methods == {
        "/build.bazel.remote.execution.v2.Execution/Execute",
        "/build.bazel.remote.execution.v2.Execution/WaitExecution",
        "/build.bazel.remote.execution.v2.ActionCache/GetActionResult",
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/FindMissingBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchReadBlobs",
        "/build.bazel.remote.execution.v2.ContentAddressableStorage/GetTree",
        "/build.bazel.remote.execution.v2.Capabilities/GetCapabilities",
        "/google.bytestream.ByteStream/Read",
        "/google.bytestream.ByteStream/Write",
        "/google.bytestream.ByteStream/QueryWriteStatus",
    }
    execute = re.DESCRIPTOR.services_by_name["Execution"].methods_by_name["Execute"]
    assert execute.output_type is operations_pb2.Operation.DESCRIPTOR


def _action_result() -> re.ActionResult:
    return re.ActionResult(
        output_files=[
            re.OutputFile(path="out/a.o", digest=re.Digest(hash="ab" * 32, size_bytes=12), is_executable=True)
        ],
        output_symlinks=[re.OutputSymlink(path="out/link", target="a.o")],
        output_directories=[
            re.OutputDirectory(
                path="out/dir",
                tree_digest=re.Digest(hash="cd" * 32, size_bytes=40),
                is_topologically_sorted=True,
            )
        ],
        exit_code=3,
        stdout_digest=re.Digest(hash="ef" * 32, size_bytes=5),
        execution_metadata=re.ExecutedActionMetadata(
            worker="worker-1",
            execution_start_timestamp=timestamp_pb2.Timestamp(seconds=100),
            execution_completed_timestamp=timestamp_pb2.Timestamp(seconds=101, nanos=5),
            virtual_execution_duration=duration_pb2.Duration(seconds=1, nanos=5),
            auxiliary_metadata=[_packed(re.ToolDetails(tool_name="probe"))],
        ),
    )


def _packed(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def test_action_result_round_trips() -> None:
    """What the cache stores is what a client reads back, byte for byte."""
    result = _action_result()
    decoded = re.ActionResult.FromString(result.SerializeToString())
    assert decoded == result
    assert decoded.SerializeToString() == result.SerializeToString()
    assert decoded.exit_code == 3
    details = re.ToolDetails()
    assert decoded.execution_metadata.auxiliary_metadata[0].Unpack(details)
    assert details.tool_name == "probe"


def test_operation_carries_an_execute_response() -> None:
    """Execute's last Operation holds the ExecuteResponse in an Any that clients unpack by type URL."""
    response = re.ExecuteResponse(
        result=_action_result(),
        status=status_pb2.Status(code=code_pb2.DEADLINE_EXCEEDED, message="timed out after 1s"),
        server_logs={
            "worker": re.LogFile(digest=re.Digest(hash="01" * 32, size_bytes=9), human_readable=True)
        },
    )
    metadata = re.ExecuteOperationMetadata(
        stage=re.ExecutionStage.COMPLETED, action_digest=re.Digest(hash="02" * 32, size_bytes=140)
    )
    operation = operations_pb2.Operation(
        name="operations/1", done=True, metadata=_packed(metadata), response=_packed(response)
    )

    decoded = operations_pb2.Operation.FromString(operation.SerializeToString())

    assert decoded.response.type_url == "type.googleapis.com/build.bazel.remote.execution.v2.ExecuteResponse"
    unpacked = re.ExecuteResponse()
    assert decoded.response.Unpack(unpacked)
    assert unpacked == response
    assert unpacked.server_logs["worker"].human_readable
    stage = re.ExecuteOperationMetadata()
    assert decoded.metadata.Unpack(stage)
    assert stage.stage == re.ExecutionStage.COMPLETED


def test_missing_blobs_become_a_grpc_status_with_details() -> None:
    """Execute reports missing inputs as FAILED_PRECONDITION with a PreconditionFailure clients parse."""
    failure = error_details_pb2.PreconditionFailure(
        violations=[
            error_details_pb2.PreconditionFailure.Violation(
                type="MISSING", subject=f"blobs/{'03' * 32}/7", description="input not in the CAS"
            )
        ]
    )
    status = status_pb2.Status(
        code=code_pb2.FAILED_PRECONDITION, message="missing inputs", details=[any_pb2.Any()]
    )
    status.details[0].Pack(failure)

    wire = rpc_status.to_status(status)

    assert wire.code is grpc.StatusCode.FAILED_PRECONDITION
    (key, value), *_ = wire.trailing_metadata
    assert key == "grpc-status-details-bin"
    parsed = status_pb2.Status.FromString(value)
    unpacked = error_details_pb2.PreconditionFailure()
    assert parsed.details[0].Unpack(unpacked)
    assert unpacked.violations[0].subject.endswith("/7")


def test_request_metadata_decodes_from_its_header() -> None:
    """Bazel sends RequestMetadata encoded in a binary header; the worker decodes it with this class."""
    header = "build.bazel.remote.execution.v2.requestmetadata-bin"
    sent = re.RequestMetadata(
        tool_details=re.ToolDetails(tool_name="bazel", tool_version="4.2.3"),
        action_id="a1",
        tool_invocation_id="inv-1",
        action_mnemonic="CppCompile",
    )
    metadata = ((header, sent.SerializeToString()),)
    received = re.RequestMetadata.FromString(dict(metadata)[header])
    assert received == sent


class _Capabilities(re_grpc.CapabilitiesServicer):
    def GetCapabilities(
        self, request: re.GetCapabilitiesRequest, context: grpc.ServicerContext
    ) -> re.ServerCapabilities:
        return re.ServerCapabilities(
            cache_capabilities=re.CacheCapabilities(digest_functions=[re.DigestFunction.SHA256]),
            high_api_version=semver.SemVer(major=2, minor=3),
        )


class _ByteStream(bs_grpc.ByteStreamServicer):
    def Read(self, request: bs.ReadRequest, context: grpc.ServicerContext) -> Iterator[bs.ReadResponse]:
        yield bs.ReadResponse(data=request.resource_name.encode()[request.read_offset :])

    def Write(
        self, request_iterator: Iterator[bs.WriteRequest], context: grpc.ServicerContext
    ) -> bs.WriteResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not needed by this test")

    def QueryWriteStatus(
        self, request: bs.QueryWriteStatusRequest, context: grpc.ServicerContext
    ) -> bs.QueryWriteStatusResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not needed by this test")


def test_generated_stubs_talk_over_a_real_channel() -> None:
    """The servicer and stub modules agree on method paths and codecs end to end."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    re_grpc.add_CapabilitiesServicer_to_server(_Capabilities(), server)
    bs_grpc.add_ByteStreamServicer_to_server(_ByteStream(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            capabilities = re_grpc.CapabilitiesStub(channel).GetCapabilities(
                re.GetCapabilitiesRequest(), timeout=10
            )
            chunks = list(
                bs_grpc.ByteStreamStub(channel).Read(
                    bs.ReadRequest(resource_name="blobs/abc/3", read_offset=6), timeout=10
                )
            )
    finally:
        server.stop(grace=None)
    assert list(capabilities.cache_capabilities.digest_functions) == [re.DigestFunction.SHA256]
    assert capabilities.high_api_version.minor == 3
    assert b"".join(chunk.data for chunk in chunks) == b"abc/3"
