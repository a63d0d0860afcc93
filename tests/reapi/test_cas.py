"""ContentAddressableStorage: FindMissingBlobs, BatchUpdateBlobs and BatchReadBlobs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import grpc
import pytest
from _reapi_support import MAX_MESSAGE, ReapiServer, pb_digest
from google.rpc import code_pb2, error_details_pb2
from grpc_status import rpc_status

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb


def test_find_missing_lists_exactly_the_absent(reapi: ReapiServer) -> None:
    """Clients upload only what FindMissingBlobs returns, so present blobs must not be listed."""
    present = reapi.upload(b"one", b"two")
    absent = [pb_digest(b"three"), pb_digest(b"four")]
    assert reapi.missing(present[0], absent[0], present[1], absent[1]) == absent


def test_find_missing_refuses_too_many_digests(start_reapi: Callable[..., ReapiServer]) -> None:
    """A bounded request size keeps one call from occupying the worker; the client is told to split."""
    reapi = start_reapi(max_digests_per_request=3)
    with pytest.raises(grpc.RpcError) as info:
        reapi.missing(*(pb_digest(bytes([i])) for i in range(4)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "blob_digests" in info.value.details()


def test_malformed_digest_names_its_field(reapi: ReapiServer) -> None:
    """The BadRequest detail points at the exact bad digest, so a client bug is found fast."""
    bad = re_pb.Digest(hash="ABC", size_bytes=3)
    with pytest.raises(grpc.RpcError) as info:
        reapi.missing(pb_digest(b"ok"), bad)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = rpc_status.from_call(info.value)
    detail = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(detail)
    assert [v.field for v in detail.field_violations] == ["blob_digests[1].hash"]


def test_batch_update_then_read(reapi: ReapiServer) -> None:
    """Blobs written in a batch read back byte for byte, each with an OK status."""
    blobs = [b"alpha", b"", b"x" * 100_000]
    digests = reapi.upload(*blobs)
    response = reapi.cas.BatchReadBlobs(re_pb.BatchReadBlobsRequest(digests=digests))
    assert [r.status.code for r in response.responses] == [code_pb2.OK] * 3
    assert [r.data for r in response.responses] == blobs
    assert [r.digest for r in response.responses] == digests
    assert reapi.missing(*digests) == []


def test_batch_update_wrong_digest_is_refused_alone(reapi: ReapiServer) -> None:
    """A blob whose bytes do not match its digest is never stored; the good blob beside it is."""
    good = b"good bytes"
    wrong = re_pb.Digest(hash=hashlib.sha256(b"other bytes").hexdigest(), size_bytes=len(good))
    response = reapi.cas.BatchUpdateBlobs(
        re_pb.BatchUpdateBlobsRequest(
            requests=[
                re_pb.BatchUpdateBlobsRequest.Request(digest=wrong, data=good),
                re_pb.BatchUpdateBlobsRequest.Request(digest=pb_digest(good), data=good),
            ]
        )
    )
    assert [r.status.code for r in response.responses] == [code_pb2.INVALID_ARGUMENT, code_pb2.OK]
    assert response.responses[0].digest == wrong
    assert reapi.missing(wrong, pb_digest(good)) == [wrong]


def test_batch_update_size_mismatch_is_refused(reapi: ReapiServer) -> None:
    """Data of another length than the digest says is refused before anything is written."""
    digest = re_pb.Digest(hash=hashlib.sha256(b"abc").hexdigest(), size_bytes=4)
    response = reapi.cas.BatchUpdateBlobs(
        re_pb.BatchUpdateBlobsRequest(
            requests=[re_pb.BatchUpdateBlobsRequest.Request(digest=digest, data=b"abc")]
        )
    )
    assert response.responses[0].status.code == code_pb2.INVALID_ARGUMENT
    assert reapi.missing(digest) == [digest]


def test_batch_read_reports_absent_blobs_per_blob(reapi: ReapiServer) -> None:
    """One absent blob does not fail the batch: the client re-fetches just that one."""
    [present] = reapi.upload(b"here")
    absent = pb_digest(b"not here")
    response = reapi.cas.BatchReadBlobs(re_pb.BatchReadBlobsRequest(digests=[absent, present]))
    assert [r.status.code for r in response.responses] == [code_pb2.NOT_FOUND, code_pb2.OK]
    assert response.responses[1].data == b"here"
    assert response.responses[0].data == b""


def test_batch_read_refuses_a_response_over_the_limit(reapi: ReapiServer) -> None:
    """Blobs adding up past the message limit are refused up front, not sent as a failing response."""
    big = re_pb.Digest(hash="a" * 64, size_bytes=MAX_MESSAGE // 2 + 1)
    with pytest.raises(grpc.RpcError) as info:
        reapi.cas.BatchReadBlobs(re_pb.BatchReadBlobsRequest(digests=[big, big]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "ByteStream.Read" in info.value.details()


def test_other_digest_functions_are_refused(reapi: ReapiServer) -> None:
    """Only SHA-256 is served: a SHA-1 request must fail rather than be read as SHA-256."""
    with pytest.raises(grpc.RpcError) as info:
        reapi.cas.FindMissingBlobs(re_pb.FindMissingBlobsRequest(digest_function=re_pb.DigestFunction.SHA1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SHA1" in info.value.details()
