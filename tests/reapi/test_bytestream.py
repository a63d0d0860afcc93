"""google.bytestream.ByteStream: blob reads in chunks, verified and resumable writes."""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import grpc
import pytest
from _reapi_support import ReapiServer, pb_digest

from expbuild_worker.api.reapi import bytestream_pb2 as bs_pb
from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb

CHUNK = 256 << 10


def _read_name(digest: re_pb.Digest, instance: str = "") -> str:
    return f"{instance + '/' if instance else ''}blobs/{digest.hash}/{digest.size_bytes}"


def _upload_name(digest: re_pb.Digest, form: str = "blobs") -> str:
    return f"uploads/{uuid.uuid4()}/{form}/{digest.hash}/{digest.size_bytes}"


def _pieces(name: str, data: bytes, start: int = 0, finish: bool = True) -> Iterator[bs_pb.WriteRequest]:
    offset = start
    while True:
        piece = data[offset : offset + CHUNK]
        last = offset + len(piece) >= len(data)
        yield bs_pb.WriteRequest(
            resource_name=name if offset == start else "",
            write_offset=offset,
            data=piece,
            finish_write=finish and last,
        )
        offset += len(piece)
        if last:
            return


def _read(reapi: ReapiServer, name: str, offset: int = 0, limit: int = 0) -> list[bytes]:
    request = bs_pb.ReadRequest(resource_name=name, read_offset=offset, read_limit=limit)
    return [r.data for r in reapi.bytestream.Read(request)]


def _wait_for(condition: Callable[[], bool]) -> None:
    """Poll until ``condition`` holds; fails the test if it never does (not a timing assertion)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


def test_read_in_chunks_of_at_most_one_mebibyte(reapi: ReapiServer) -> None:
    """Clients reassemble large blobs from chunks that each fit any message limit."""
    data = os.urandom((3 << 20) + 5)
    digest = pb_digest(data)
    reapi.bytestream.Write(_pieces(_upload_name(digest), data))
    chunks = _read(reapi, _read_name(digest))
    assert b"".join(chunks) == data
    assert max(len(c) for c in chunks) <= 1 << 20


def test_read_offset_and_limit(reapi: ReapiServer) -> None:
    """Resuming a download needs exactly the bytes from the offset, at most limit of them."""
    data = bytes(range(256)) * 10
    [digest] = reapi.upload(data)
    assert b"".join(_read(reapi, _read_name(digest), offset=100, limit=50)) == data[100:150]
    assert b"".join(_read(reapi, _read_name(digest), offset=2000)) == data[2000:]
    assert b"".join(_read(reapi, _read_name(digest), offset=len(data))) == b""


def test_read_past_the_end_is_out_of_range(reapi: ReapiServer) -> None:
    """ByteStream specifies OUT_OF_RANGE for an offset beyond the blob, so clients can tell it from a bug."""
    [digest] = reapi.upload(b"short")
    with pytest.raises(grpc.RpcError) as info:
        _read(reapi, _read_name(digest), offset=6)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE


def test_read_of_an_absent_blob_is_not_found(reapi: ReapiServer) -> None:
    """NOT_FOUND tells the client to upload or re-run, not to retry."""
    with pytest.raises(grpc.RpcError) as info:
        _read(reapi, _read_name(pb_digest(b"never stored")))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_read_under_the_served_instance_name(start_reapi: Callable[..., ReapiServer]) -> None:
    """Resource names carry the instance; the served one works and another is refused by name."""
    reapi = start_reapi(instance_name="team/main")
    [digest] = reapi.upload(b"data")
    assert _read(reapi, _read_name(digest, "team/main")) == [b"data"]
    with pytest.raises(grpc.RpcError) as info:
        _read(reapi, _read_name(digest, "team/other"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "team/other" in info.value.details()


def test_write_then_read(reapi: ReapiServer) -> None:
    """A written blob is stored under its digest and reads back identically."""
    data = os.urandom(CHUNK * 2 + 17)
    digest = pb_digest(data)
    name = _upload_name(digest)
    response = reapi.bytestream.Write(_pieces(name, data))
    assert response.committed_size == len(data)
    assert b"".join(_read(reapi, _read_name(digest))) == data
    status = reapi.bytestream.QueryWriteStatus(bs_pb.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (len(data), True)


def test_write_with_a_wrong_digest_is_refused_and_absent(reapi: ReapiServer) -> None:
    """Bytes that do not hash to the name are never served under it."""
    data = os.urandom(CHUNK + 3)
    claimed = pb_digest(os.urandom(len(data)))
    name = _upload_name(claimed)
    with pytest.raises(grpc.RpcError) as info:
        reapi.bytestream.Write(_pieces(name, data))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reapi.missing(claimed) == [claimed]
    with pytest.raises(grpc.RpcError) as query:
        reapi.bytestream.QueryWriteStatus(bs_pb.QueryWriteStatusRequest(resource_name=name))
    assert query.value.code() == grpc.StatusCode.NOT_FOUND


def test_write_of_a_stored_blob_completes_at_once(reapi: ReapiServer) -> None:
    """A client need not send bytes the server has: the first message completes the write."""
    data = os.urandom(CHUNK * 3)
    [digest] = reapi.upload(data)
    first_only = [next(_pieces(_upload_name(digest), data))]
    assert not first_only[0].finish_write
    assert reapi.bytestream.Write(iter(first_only)).committed_size == len(data)


def test_write_resumes_after_a_broken_stream(reapi: ReapiServer) -> None:
    """A stream cut halfway keeps its bytes; QueryWriteStatus says where, and a new Write finishes it."""
    data = os.urandom(CHUNK * 4)
    digest = pb_digest(data)
    name = _upload_name(digest)
    half = len(data) // 2
    hold = threading.Event()

    def first_half() -> Iterator[bs_pb.WriteRequest]:
        yield from _pieces(name, data[:half], finish=False)
        hold.wait(30)  # the stream stays open until the test cancels it

    call = reapi.bytestream.Write.future(first_half())

    def committed() -> int:
        try:
            request = bs_pb.QueryWriteStatusRequest(resource_name=name)
            return reapi.bytestream.QueryWriteStatus(request).committed_size
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.NOT_FOUND  # the first message is still on its way
            return -1

    _wait_for(lambda: committed() == half)
    call.cancel()
    hold.set()
    status = reapi.bytestream.QueryWriteStatus(bs_pb.QueryWriteStatusRequest(resource_name=name))
    assert (status.committed_size, status.complete) == (half, False)
    assert reapi.missing(digest) == [digest]

    response = reapi.bytestream.Write(_pieces(name, data, start=status.committed_size))
    assert response.committed_size == len(data)
    assert b"".join(_read(reapi, _read_name(digest))) == data


def test_resume_at_a_wrong_offset_is_refused_and_keeps_the_bytes(reapi: ReapiServer) -> None:
    """A client that resumes at the wrong place is told so, and what was received stays."""
    data = os.urandom(CHUNK * 2)
    digest = pb_digest(data)
    name = _upload_name(digest)
    with pytest.raises(grpc.RpcError) as info:  # ends without finish_write: an error, bytes kept
        reapi.bytestream.Write(_pieces(name, data[:CHUNK], finish=False))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        reapi.bytestream.Write(_pieces(name, data, start=CHUNK + 1))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "write_offset" in info.value.details()
    status = reapi.bytestream.QueryWriteStatus(bs_pb.QueryWriteStatusRequest(resource_name=name))
    assert status.committed_size == CHUNK
    assert reapi.bytestream.Write(_pieces(name, data, start=CHUNK)).committed_size == len(data)


def test_compressed_identity_is_served_and_other_compressors_refused(reapi: ReapiServer) -> None:
    """IDENTITY is advertised, so its compressed-blobs form works; zstd is not, and says so."""
    data = b"plain bytes"
    digest = pb_digest(data)
    assert reapi.bytestream.Write(
        _pieces(_upload_name(digest, "compressed-blobs/identity"), data)
    ).committed_size
    assert reapi.missing(digest) == []
    with pytest.raises(grpc.RpcError) as info:
        reapi.bytestream.Write(_pieces(_upload_name(pb_digest(b"z"), "compressed-blobs/zstd"), b"z"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "zstd" in info.value.details()
