"""A small blocking client for one worker, over the generated stubs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.api.v1.digests import digest_to_pb, digests_from_pb
from expbuild_worker.client._credentials import ChannelSecurity, open_channel
from expbuild_worker.client._inputs import InputTree
from expbuild_worker.client._logs import LogReassembler
from expbuild_worker.client._outputs import OutputWriter
from expbuild_worker.errors import UnavailableError
from expbuild_worker.model import Digest

__all__ = ["UPLOAD_CHUNK_BYTES", "Execution", "WorkerClient"]

UPLOAD_CHUNK_BYTES = 1 << 20
"""Largest piece of a blob in one UploadBlobsRequest: far below message caps, large enough to stream fast."""

_FIND_MISSING_BATCH = 4096
_MAX_MESSAGE_BYTES = 64 << 20

LogSink = Callable[[bytes], None]


class Execution:
    """One Execute call in flight: iterate its events; leaving the ``with`` block early cancels it.

    Cancelling the RPC is how a client stops an action it no longer wants: the worker kills
    the action and cleans up, exactly as for CancelExecution.
    """

    def __init__(self, call: Any) -> None:
        self._call = call
        self._finished = False
        self.execution_id = ""
        """The worker's id for the action, known once the ``accepted`` event arrived."""

    def __iter__(self) -> Iterator[pb.ExecuteResponse]:
        for response in self._call:
            if response.WhichOneof("event") == "accepted":
                self.execution_id = response.accepted.execution_id
            yield response
        self._finished = True

    def cancel(self) -> None:
        """Cancel the RPC (the worker kills the action); later iteration raises grpc.RpcError CANCELLED."""
        self._call.cancel()

    def __enter__(self) -> Execution:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._finished:
            self.cancel()


class WorkerClient:
    """Blocking client for one worker at ``target`` ("HOST:PORT").

    RPC failures surface as ``grpc.RpcError`` with the worker's status code and message;
    problems found on this side are WorkerError subclasses. Unary calls wait at most
    ``rpc_timeout`` seconds and fail fast when the worker cannot be reached; Execute,
    UploadBlobs and ReadBlob have no deadline, since an action may legitimately run for hours.
    """

    def __init__(
        self,
        target: str,
        *,
        rpc_timeout: float = 30.0,
        channel: grpc.Channel | None = None,
        security: ChannelSecurity | None = None,
    ) -> None:
        """``security`` says how to prove who we are (TLS, client certificate, token); None is
        plaintext without a token, for a worker on loopback."""
        self.target = target
        self._rpc_timeout = rpc_timeout
        self._channel = channel or open_channel(
            target,
            security,
            options=[
                ("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", _MAX_MESSAGE_BYTES),
            ],
        )
        self.stub = pb_grpc.WorkerServiceStub(self._channel)
        """The generated stub, for calls this class does not wrap."""

    @property
    def channel(self) -> grpc.Channel:
        """The channel every call goes through (to watch its connectivity, or for other stubs)."""
        return self._channel

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def get_capabilities(self) -> pb.GetCapabilitiesResponse:
        response: pb.GetCapabilitiesResponse = self.stub.GetCapabilities(
            pb.GetCapabilitiesRequest(), timeout=self._rpc_timeout
        )
        return response

    def check_health(self, service: str = "") -> str:
        """The standard health status of ``service`` ("" = the whole worker), e.g. "SERVING"."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=self._rpc_timeout)
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
        return name

    def cancel_execution(self, execution_id: str) -> bool:
        """Ask the worker to cancel an action; True when it was still queued or running."""
        response: pb.CancelExecutionResponse = self.stub.CancelExecution(
            pb.CancelExecutionRequest(execution_id=execution_id), timeout=self._rpc_timeout
        )
        return response.was_active

    def find_missing_blobs(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests the worker's store lacks, in the order given."""
        wanted = list(dict.fromkeys(digests))
        missing: list[Digest] = []
        for start in range(0, len(wanted), _FIND_MISSING_BATCH):
            batch = wanted[start : start + _FIND_MISSING_BATCH]
            request = pb.FindMissingBlobsRequest(digests=[digest_to_pb(d) for d in batch])
            response: pb.FindMissingBlobsResponse = self.stub.FindMissingBlobs(
                request, timeout=self._rpc_timeout
            )
            missing.extend(digests_from_pb(response.missing_digests))
        return missing

    def upload_blobs(self, blobs: Mapping[Digest, Path]) -> list[Digest]:
        """Upload the local files whose digests the store lacks; return the digests uploaded.

        Asks FindMissingBlobs first, then streams each missing file from disk in pieces of
        at most UPLOAD_CHUNK_BYTES in one UploadBlobs call. A file that changed since it was
        digested is refused by the worker's verification (INVALID_ARGUMENT).
        """
        missing = self.find_missing_blobs(blobs)
        if not missing:
            return []
        response: pb.UploadBlobsResponse = self.stub.UploadBlobs(_upload_requests(missing, blobs))
        stored = set(digests_from_pb(response.stored))
        lacking = [d for d in missing if d not in stored]
        if lacking:
            raise UnavailableError(f"worker at {self.target} did not confirm storing blob {lacking[0]}")
        return missing

    def upload_inputs(self, inputs: InputTree) -> list[Digest]:
        """Make every file of ``inputs`` present in the worker's store; return the digests uploaded."""
        return self.upload_blobs(inputs.blobs())

    def read_blob(self, digest: pb.Digest) -> Iterator[bytes]:
        """Stream one blob's bytes in order (NOT_FOUND as grpc.RpcError when the store lacks it)."""
        offset = 0
        for piece in self.stub.ReadBlob(pb.ReadBlobRequest(digest=digest)):
            if piece.offset != offset:
                raise UnavailableError(
                    f"blob {digest.sha256}: piece at offset {piece.offset} does not follow byte {offset}"
                )
            offset += len(piece.data)
            yield piece.data

    def execute(self, request: pb.ExecuteRequest) -> Execution:
        """Start an action; iterate the returned Execution for its events."""
        return Execution(self.stub.Execute(request))

    def run(
        self,
        request: pb.ExecuteRequest,
        *,
        stdout: LogSink | None = None,
        stderr: LogSink | None = None,
        outputs: OutputWriter | None = None,
    ) -> pb.ExecutionResult:
        """Run an action to its end and return its result.

        Log bytes go to ``stdout`` and ``stderr`` as they arrive, reassembled by offset; output
        chunks go to ``outputs``, whose manifest is applied (fetching omitted contents with
        ReadBlob) before returning. Any exception, KeyboardInterrupt included, cancels the
        action on the worker before it propagates.
        """
        sinks = {pb.LOG_STREAM_STDOUT: stdout, pb.LOG_STREAM_STDERR: stderr}
        logs = LogReassembler()
        result: pb.ExecutionResult | None = None
        try:
            with self.execute(request) as execution:
                for event in execution:
                    kind = event.WhichOneof("event")
                    if kind == "log":
                        data = logs.feed(event.log)
                        sink = sinks.get(event.log.stream)
                        if data and sink is not None:
                            sink(data)
                    elif kind == "output_chunk" and outputs is not None:
                        outputs.write(event.output_chunk)
                    elif kind == "result":
                        result = event.result
            if result is None:
                raise UnavailableError(f"Execute stream from worker at {self.target} ended without a result")
            if outputs is not None:
                outputs.finish(result, read_blob=self.read_blob)
        finally:
            if outputs is not None:
                outputs.close()
        return result


def _upload_requests(missing: list[Digest], files: Mapping[Digest, Path]) -> Iterator[pb.UploadBlobsRequest]:
    for digest in missing:
        proto = digest_to_pb(digest)
        offset = 0
        with open(files[digest], "rb") as fh:
            while offset < digest.size:
                data = fh.read(min(UPLOAD_CHUNK_BYTES, digest.size - offset))
                if not data:
                    break
                yield pb.UploadBlobsRequest(digest=proto, offset=offset, data=data)
                offset += len(data)
