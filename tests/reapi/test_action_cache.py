"""ActionCache: results round-trip, are complete when returned, and refer only to stored blobs."""

from __future__ import annotations

import os
from collections.abc import Callable

import grpc
import pytest
from _reapi_support import ReapiServer, pb_digest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb

ACTION = pb_digest(b"an Action message")


def _result(reapi: ReapiServer) -> re_pb.ActionResult:
    out, stdout = reapi.upload(b"output file", b"what it printed")
    tree = re_pb.Tree(
        root=re_pb.Directory(files=[re_pb.FileNode(name="in-tree", digest=reapi.upload(b"t")[0])])
    )
    [tree_digest] = reapi.upload(tree.SerializeToString())
    return re_pb.ActionResult(
        output_files=[re_pb.OutputFile(path="out/a.o", digest=out)],
        output_directories=[re_pb.OutputDirectory(path="out/dir", tree_digest=tree_digest)],
        stdout_digest=stdout,
        exit_code=0,
    )


def _update(reapi: ReapiServer, result: re_pb.ActionResult) -> re_pb.ActionResult:
    request = re_pb.UpdateActionResultRequest(action_digest=ACTION, action_result=result)
    return reapi.ac.UpdateActionResult(request)


def _get(reapi: ReapiServer, **kwargs: object) -> re_pb.ActionResult:
    return reapi.ac.GetActionResult(re_pb.GetActionResultRequest(action_digest=ACTION, **kwargs))


def test_update_then_get(reapi: ReapiServer) -> None:
    """A stored result comes back unchanged: that is what makes a remote cache hit."""
    result = _result(reapi)
    assert _update(reapi, result) == result
    assert _get(reapi) == result


def test_absent_result_is_not_found(reapi: ReapiServer) -> None:
    """NOT_FOUND is the cache miss clients expect; they then execute the action."""
    with pytest.raises(grpc.RpcError) as info:
        _get(reapi)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_update_refuses_missing_blobs_and_lists_exactly_them(reapi: ReapiServer) -> None:
    """A result whose outputs cannot be downloaded is refused; the details name each blob to upload."""
    [present] = reapi.upload(b"present")
    gone_file, gone_stderr = pb_digest(b"never uploaded"), pb_digest(b"no stderr either")
    result = re_pb.ActionResult(
        output_files=[
            re_pb.OutputFile(path="a", digest=present),
            re_pb.OutputFile(path="b", digest=gone_file),
        ],
        stderr_digest=gone_stderr,
    )
    with pytest.raises(grpc.RpcError) as info:
        _update(reapi, result)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    status = rpc_status.from_call(info.value)
    failure = error_details_pb2.PreconditionFailure()
    assert status.details[0].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [
        ("MISSING", f"blobs/{d.hash}/{d.size_bytes}") for d in (gone_file, gone_stderr)
    ]
    with pytest.raises(grpc.RpcError) as miss:
        _get(reapi)
    assert miss.value.code() == grpc.StatusCode.NOT_FOUND


def test_result_with_an_evicted_blob_is_not_found(start_reapi: Callable[..., ReapiServer]) -> None:
    """A client must never get a hit it cannot download: an evicted output turns the hit into a miss."""
    reapi = start_reapi(store_bytes=1 << 20, result_blobs_kept_seconds=0)
    result = _result(reapi)
    _update(reapi, result)
    referenced = [result.output_files[0].digest, result.stdout_digest]
    filler = reapi.upload(*(os.urandom(400 << 10) for _ in range(3)))  # newer blobs push the old out
    assert reapi.missing(filler[-1]) == []
    assert reapi.missing(*referenced)
    with pytest.raises(grpc.RpcError) as info:
        _get(reapi)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_inline_contents_on_request(reapi: ReapiServer) -> None:
    """Asked-for stdout and files come inline, saving the client a round trip per blob."""
    result = _result(reapi)
    _update(reapi, result)
    plain = _get(reapi)
    assert plain.stdout_raw == b""
    assert plain.output_files[0].contents == b""
    inlined = _get(reapi, inline_stdout=True, inline_output_files=["out/a.o"])
    assert inlined.stdout_raw == b"what it printed"
    assert inlined.output_files[0].contents == b"output file"
    assert inlined.stdout_digest == result.stdout_digest
