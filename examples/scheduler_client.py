"""How a scheduler drives a worker with nothing but the generated stubs and grpcio.

Run a worker (``make run``), then::

    python examples/scheduler_client.py --target 127.0.0.1:50051

It asks for the worker's capabilities, uploads a blob once, runs an action that reads it and
writes outputs, reassembles stdout/stderr by offset, verifies every output against its digest,
then shows a refused request (an RPC error), a cancelled action (a result) and an output read
back with ReadBlob. It exits 0 when everything behaved as the API promises.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import grpc

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc

UPLOAD_PIECE_BYTES = 1 << 20  # keep each UploadBlobsRequest far below the message size cap
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}  # the whole environment: nothing is inherited


@dataclass
class Outcome:
    """What one Execute stream carried, reassembled."""

    execution_id: str = ""
    executor: str = ""
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    outputs: dict[str, bytearray] = field(default_factory=dict)
    result: pb.ExecutionResult | None = None


def digest_of(data: bytes) -> pb.Digest:
    return pb.Digest(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def upload_blob(stub: pb_grpc.WorkerServiceStub, data: bytes) -> pb.Digest:
    """Make ``data`` present in the worker's store; upload only when FindMissingBlobs says so."""
    digest = digest_of(data)
    missing = stub.FindMissingBlobs(pb.FindMissingBlobsRequest(digests=[digest]), timeout=10).missing_digests
    if missing:

        def pieces() -> Iterator[pb.UploadBlobsRequest]:
            for offset in range(0, len(data), UPLOAD_PIECE_BYTES):
                chunk = data[offset : offset + UPLOAD_PIECE_BYTES]
                yield pb.UploadBlobsRequest(digest=digest, offset=offset, data=chunk)

        stored = stub.UploadBlobs(pieces(), timeout=60).stored
        assert [d.sha256 for d in stored] == [digest.sha256], "the worker did not store the blob"
    return digest


def run(
    stub: pb_grpc.WorkerServiceStub,
    request: pb.ExecuteRequest,
    *,
    on_accepted: Callable[[str], object] | None = None,
) -> Outcome:
    """Read one Execute stream to its end.

    Events come in order: accepted, started, log chunks (each stream's offsets contiguous),
    output chunks (each file's offsets contiguous), and exactly one result, last. A status
    such as TIMED_OUT is a result; only a refused request or a broken stream is an RpcError.
    """
    out = Outcome()
    logs = {pb.LOG_STREAM_STDOUT: out.stdout, pb.LOG_STREAM_STDERR: out.stderr}
    for response in stub.Execute(request):
        kind = response.WhichOneof("event")
        if kind == "accepted":
            out.execution_id = response.accepted.execution_id
            out.executor = response.accepted.executor
            if on_accepted is not None:
                on_accepted(out.execution_id)
        elif kind == "log":
            buf = logs[response.log.stream]
            assert response.log.offset == len(buf), "log chunks of a stream are contiguous"
            buf.extend(response.log.data)
        elif kind == "output_chunk":
            chunk = response.output_chunk
            buf = out.outputs.setdefault(chunk.path, bytearray())
            assert chunk.offset == len(buf), "output chunks of a file are contiguous"
            buf.extend(chunk.data)
        elif kind == "result":
            out.result = response.result
    assert out.result is not None, "every stream ends with a result"
    return out


def verify_outputs(out: Outcome) -> None:
    """Every listed file's bytes must match its digest; empty files send no chunks."""
    assert out.result is not None
    for f in out.result.output_files:
        data = bytes(out.outputs.get(f.path, b""))
        assert digest_of(data) == f.digest, f"{f.path}: content does not match its digest"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", required=True, help="the worker, HOST:PORT")
    args = parser.parse_args(argv)

    with grpc.insecure_channel(args.target) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)

        # 1. What can this worker do?
        caps = stub.GetCapabilities(pb.GetCapabilitiesRequest(), timeout=10)
        for ex in caps.executors:
            level = pb.IsolationLevel.Name(ex.isolation_level)
            print(f"executor {ex.name}: {level}, ready={ex.ready}")

        # 2. Upload an input once; reference it by digest from any number of actions.
        tool = b'#!/bin/sh\necho "tool says: $1"\n'
        tool_digest = upload_blob(stub, tool)
        print(f"uploaded tool.sh as {tool_digest.sha256[:12]}/{tool_digest.size_bytes}")

        # 3. Run an action: inputs by digest and inline, outputs back, logs apart.
        request = pb.ExecuteRequest(
            argv=[
                "/bin/sh",
                "-c",
                "bin/tool.sh hello; echo to-stderr >&2; mkdir -p out; "
                "cp msg.txt out/copy.txt; : > out/empty; exit 3",
            ],
            environment=ENV,
            input_files=[
                pb.InputFile(path="bin/tool.sh", digest=tool_digest, is_executable=True),
                pb.InputFile(path="msg.txt", content=b"inline input\n"),
            ],
            output_directories=["out"],
        )
        request.timeout.FromSeconds(60)
        out = run(stub, request)
        assert out.result is not None
        verify_outputs(out)
        status = pb.ExecutionStatus.Name(out.result.status)
        print(f"{out.execution_id} on {out.executor}: {status}, exit code {out.result.exit_code}")
        print(f"stdout {bytes(out.stdout)!r} stderr {bytes(out.stderr)!r}")
        print(f"outputs: {', '.join(f.path for f in out.result.output_files)}")
        ok = (
            out.result.status == pb.EXECUTION_STATUS_COMPLETED
            and out.result.exit_code == 3
            and bytes(out.stdout) == b"tool says: hello\n"
            and bytes(out.outputs["out/copy.txt"]) == b"inline input\n"
        )

        # 4. A request the worker refuses is an RPC error, never a result.
        try:
            run(stub, pb.ExecuteRequest(argv=["/bin/true"], environment=ENV, output_files=["../escape"]))
            ok = False
        except grpc.RpcError as err:
            print(f"refused: {err.code().name}: {err.details()}")
            ok = ok and err.code() == grpc.StatusCode.INVALID_ARGUMENT

        # 5. Cancel by id: the stream still ends with a result, CANCELLED.
        execution_id = f"example-{uuid.uuid4().hex[:12]}"
        sleeper = pb.ExecuteRequest(execution_id=execution_id, argv=["/bin/sleep", "600"], environment=ENV)
        cancelled = run(
            stub,
            sleeper,
            on_accepted=lambda eid: stub.CancelExecution(
                pb.CancelExecutionRequest(execution_id=eid), timeout=10
            ),
        )
        assert cancelled.result is not None
        print(f"{execution_id}: {pb.ExecutionStatus.Name(cancelled.result.status)}")
        ok = ok and cancelled.result.status == pb.EXECUTION_STATUS_CANCELLED

        # 6. Large outputs can stay on the worker: list digests only, then ReadBlob what you need.
        lean = pb.ExecuteRequest(
            argv=["/bin/sh", "-c", "seq 1 100000 > numbers.txt"],
            environment=ENV,
            output_files=["numbers.txt"],
            omit_output_contents=True,
        )
        listed = run(stub, lean)
        assert listed.result is not None and not listed.outputs
        numbers = listed.result.output_files[0]
        data = b"".join(piece.data for piece in stub.ReadBlob(pb.ReadBlobRequest(digest=numbers.digest)))
        print(f"read back {numbers.path}: {len(data)} bytes, digest ok={digest_of(data) == numbers.digest}")
        ok = ok and digest_of(data) == numbers.digest

    print("all as promised" if ok else "something did not behave as the API promises")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
