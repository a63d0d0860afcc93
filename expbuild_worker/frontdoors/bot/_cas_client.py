"""The scheduler's CAS over REAPI and ByteStream, as the blocking ``RemoteCas`` the remote store calls."""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import grpc
from google.rpc import code_pb2

from expbuild_worker.api.reapi import bytestream_pb2 as bs_pb
from expbuild_worker.api.reapi import bytestream_pb2_grpc as bs_grpc
from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.errors import NotFoundError, UnavailableError
from expbuild_worker.frontdoors._remote_actions import digest_to_pb
from expbuild_worker.model import Digest

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

DEFAULT_BATCH_BYTES = 2 << 20
"""Blob bytes per batch call unless the scheduler advertises less: well inside gRPC's default
4 MiB message limit, which schedulers keep more often than not."""
_ATTEMPTS = 3
"""Tries of an idempotent call that failed with a transient status before the failure is reported."""
_TRANSIENT = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED}
)


class GrpcRemoteCas:
    """A scheduler's CAS: FindMissingBlobs, BatchReadBlobs/BatchUpdateBlobs and ByteStream.

    Blocking calls over a synchronous channel, safe from several threads at once (the remote
    store calls it from its fetch threads). Idempotent calls are retried on a transient status;
    anything else that fails is UnavailableError naming the call, so a lease that needed it is
    handed back for the scheduler to retry.
    """

    def __init__(
        self,
        *,
        channel: grpc.Channel,
        instance_name: str,
        max_batch_bytes: int = DEFAULT_BATCH_BYTES,
        call_timeout_seconds: float = 60.0,
        stream_chunk_bytes: int = 1 << 20,
    ) -> None:
        self._instance = instance_name
        self._configured_batch = max_batch_bytes
        self._timeout = call_timeout_seconds
        self._chunk = stream_chunk_bytes
        self._cas = re_grpc.ContentAddressableStorageStub(channel)
        self._capabilities = re_grpc.CapabilitiesStub(channel)
        self._bytestream = bs_grpc.ByteStreamStub(channel)
        self._batch: int | None = None
        self._lock = threading.Lock()

    @property
    def max_batch_bytes(self) -> int:
        """The configured batch size, lowered to what the scheduler advertises (asked once)."""
        with self._lock:
            if self._batch is None:
                self._batch = self._configured_batch
                try:
                    caps = self._capabilities.GetCapabilities(
                        re_pb.GetCapabilitiesRequest(instance_name=self._instance), timeout=self._timeout
                    )
                    advertised = caps.cache_capabilities.max_batch_total_size_bytes
                    if advertised > 0:
                        self._batch = min(self._batch, advertised)
                except grpc.RpcError as err:
                    _log.warning(
                        "GetCapabilities failed (%s); batches carry up to %d bytes",
                        rpc_error_text(err),
                        self._batch,
                    )
            return self._batch

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        request = re_pb.FindMissingBlobsRequest(
            instance_name=self._instance, blob_digests=[digest_to_pb(d) for d in digests]
        )
        response = self._retried(
            "FindMissingBlobs", lambda: self._cas.FindMissingBlobs(request, timeout=self._timeout)
        )
        return [Digest(d.hash, d.size_bytes) for d in response.missing_blob_digests]

    def read_batch(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        request = re_pb.BatchReadBlobsRequest(
            instance_name=self._instance, digests=[digest_to_pb(d) for d in digests]
        )
        response = self._retried(
            "BatchReadBlobs", lambda: self._cas.BatchReadBlobs(request, timeout=self._timeout)
        )
        found: dict[Digest, bytes] = {}
        for entry in response.responses:
            digest = Digest(entry.digest.hash, entry.digest.size_bytes)
            if entry.status.code == code_pb2.OK:
                found[digest] = entry.data
            elif entry.status.code != code_pb2.NOT_FOUND:
                raise UnavailableError(
                    f"BatchReadBlobs: blob {digest}: status {entry.status.code} {entry.status.message}"
                )
        return found

    def read_stream(self, digest: Digest) -> Iterator[bytes]:
        name = f"{self._instance}/blobs/{digest.sha256}/{digest.size}".lstrip("/")
        responses = self._bytestream.Read(bs_pb.ReadRequest(resource_name=name), timeout=self._timeout * 10)
        try:
            first = next(responses, None)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.NOT_FOUND:
                raise NotFoundError(f"blob {digest} is not in the remote CAS") from None
            raise UnavailableError(f"ByteStream.Read {digest}: {rpc_error_text(err)}") from err
        return self._rest(digest, first, responses)

    def _rest(
        self, digest: Digest, first: bs_pb.ReadResponse | None, responses: Iterator[bs_pb.ReadResponse]
    ) -> Iterator[bytes]:
        if first is not None:
            yield first.data
        try:
            for response in responses:
                yield response.data
        except grpc.RpcError as err:
            raise UnavailableError(f"ByteStream.Read {digest}: {rpc_error_text(err)}") from err

    def write_batch(self, blobs: Sequence[tuple[Digest, bytes]]) -> None:
        request = re_pb.BatchUpdateBlobsRequest(
            instance_name=self._instance,
            requests=[
                re_pb.BatchUpdateBlobsRequest.Request(digest=digest_to_pb(d), data=data) for d, data in blobs
            ],
        )
        response = self._retried(
            "BatchUpdateBlobs", lambda: self._cas.BatchUpdateBlobs(request, timeout=self._timeout)
        )
        for entry in response.responses:
            if entry.status.code != code_pb2.OK:
                raise UnavailableError(
                    f"BatchUpdateBlobs: blob {entry.digest.hash}/{entry.digest.size_bytes}: "
                    f"status {entry.status.code} {entry.status.message}"
                )

    def write_stream(self, digest: Digest, chunks: Iterator[bytes]) -> None:
        name = f"{self._instance}/uploads/{uuid.uuid4()}/blobs/{digest.sha256}/{digest.size}".lstrip("/")

        def requests() -> Iterator[bs_pb.WriteRequest]:
            offset = 0
            for chunk in _rechunk(chunks, self._chunk):
                yield bs_pb.WriteRequest(
                    resource_name=name if offset == 0 else "", write_offset=offset, data=chunk
                )
                offset += len(chunk)
            yield bs_pb.WriteRequest(
                resource_name=name if offset == 0 else "", write_offset=offset, finish_write=True
            )

        try:
            response = self._bytestream.Write(requests(), timeout=self._timeout * 10)
        except grpc.RpcError as err:
            raise UnavailableError(f"ByteStream.Write {digest}: {rpc_error_text(err)}") from err
        if response.committed_size != digest.size:
            raise UnavailableError(
                f"ByteStream.Write {digest}: the remote committed {response.committed_size} bytes"
            )

    def _retried(self, what: str, call: Callable[[], _T]) -> _T:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                return call()
            except grpc.RpcError as err:
                if err.code() not in _TRANSIENT or attempt == _ATTEMPTS:
                    why = rpc_error_text(err)
                    raise UnavailableError(f"{what} on the scheduler's CAS failed: {why}") from err
                time.sleep(0.2 * 2**attempt * random.uniform(0.5, 1.5))
        raise AssertionError("unreachable")


def _rechunk(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """The same bytes in pieces of at most ``size`` (a store may hand out larger ones)."""
    for chunk in chunks:
        for start in range(0, len(chunk), size):
            yield chunk[start : start + size]


def rpc_error_text(err: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, for messages and logs (tolerates errors without either)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return f"{code.name if code is not None else 'error'}: {details}"
