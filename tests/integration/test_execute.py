"""Execute through a real server and channel: streams, statuses, outputs, limits, concurrency."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time

import grpc
import pytest
from _support import BASE_ENV, action_leftovers, execute, request, wait_gone
from google.protobuf.duration_pb2 import Duration

from expbuild_worker.api.v1 import worker_pb2 as pb

SH = "/bin/sh"


def test_stdout_and_stderr_arrive_separately_and_byte_exact(stub):
    """Binary data and a missing trailing newline must survive unchanged, each on its own stream."""
    script = "printf 'out\\000\\377\\n'; printf 'err-no-newline' >&2; printf tail"
    run = execute(stub, request([SH, "-c", script]))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert bytes(run.stdout) == b"out\x00\xff\ntail"
    assert bytes(run.stderr) == b"err-no-newline"
    assert run.result.stdout.size_bytes == len(run.stdout)
    assert run.result.stdout.truncated is False


def test_all_byte_values_pass_through_stdin_and_stdout(stub):
    """stdin bytes reach the command and come back unchanged."""
    data = bytes(range(256)) * 64
    run = execute(stub, request(["/bin/cat"], stdin=data))
    assert bytes(run.stdout) == data


def test_first_chunk_arrives_while_the_command_still_runs(stub):
    """Logs stream live: the first chunk is received well before the command ends."""
    run = execute(stub, request([SH, "-c", "echo first; sleep 2; echo second"]))
    end = run.result.stats.command_end_time.ToNanoseconds() / 1e9
    assert run.first_log_at is not None and run.first_log_at < end - 1.0
    assert bytes(run.stdout) == b"first\nsecond\n"


def test_event_order_is_accepted_started_logs_result(stub):
    """Clients rely on the order: acknowledgement, start, logs, result last."""
    run = execute(stub, request([SH, "-c", "echo hi"], execution_id="order-1"))
    assert run.events[0] == "accepted" and run.events[1] == "started" and run.events[-1] == "result"
    assert run.accepted.execution_id == "order-1" and run.accepted.executor == "host"
    assert run.accepted.isolation_level == pb.ISOLATION_LEVEL_HOST
    assert run.result.execution_id == "order-1" and run.result.executor == "host"


@pytest.mark.parametrize("code", [0, 1, 255], ids=["zero", "one", "max"])
def test_exit_code_is_a_completed_result(stub, code):
    """A non-zero exit is a result, not an RPC error."""
    run = execute(stub, request([SH, "-c", f"exit {code}"]))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert run.result.exit_code == code and run.result.signal == 0


def test_death_by_signal_reports_the_signal(stub):
    """A command killed by a signal reports that signal, not an exit code."""
    run = execute(stub, request([SH, "-c", "kill -9 $$"]))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    assert run.result.signal == 9


def test_missing_program_fails_to_start(stub):
    """argv[0] that does not exist is FAILED_TO_START with a message naming it."""
    run = execute(stub, request(["/nonexistent/tool", "x"]))
    assert run.status == pb.EXECUTION_STATUS_FAILED_TO_START
    assert "/nonexistent/tool" in run.result.message


def test_arguments_beyond_the_kernel_limit_fail_to_start_saying_so(stub):
    """argv and environment larger than exec takes are FAILED_TO_START blaming their size, not argv[0]."""
    run = execute(stub, request(["/bin/echo", "x" * (1 << 20)] * 4))
    assert run.status == pb.EXECUTION_STATUS_FAILED_TO_START
    assert run.result.message.startswith("argv and environment together are too large"), run.result.message


def test_the_longest_path_allowed_is_staged_and_collected(stub):
    """A 3072-byte path, the most the API allows, works whatever the worker's own prefix."""
    path = "/".join(["p" * 254] * 12) + "/" + "f" * (3072 - 255 * 12)
    assert len(path) == 3072
    run = execute(
        stub,
        request(
            ["/bin/cp", path, "copy"],
            input_files=[pb.InputFile(path=path, content=b"deep")],
            output_files=["copy"],
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED, run.result.message
    assert bytes(run.outputs["copy"]) == b"deep"


def test_a_symlink_may_point_at_another_symlink(stub):
    """Chains are fine as long as no target passes through a symlink: b -> a -> f reads f."""
    run = execute(
        stub,
        request(
            ["/bin/cat", "b"],
            input_files=[pb.InputFile(path="f", content=b"chained")],
            input_symlinks=[pb.InputSymlink(path="a", target="f"), pb.InputSymlink(path="b", target="a")],
        ),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED and run.stdout == b"chained"


def test_timeout_kills_command_and_grandchild(stub):
    """TIMED_OUT within a few seconds, and no process of the action survives it."""
    started = time.monotonic()
    run = execute(
        stub,
        request([SH, "-c", "sleep 600 & echo $!; sleep 600"], timeout=Duration(seconds=1)),
    )
    assert run.status == pb.EXECUTION_STATUS_TIMED_OUT
    assert time.monotonic() - started < 10
    grandchild = int(run.stdout.split()[0])
    assert wait_gone(grandchild)


def test_cancel_execution_kills_the_action(stub):
    """CancelExecution ends the stream with CANCELLED and kills the process."""
    responses = stub.Execute(
        request([SH, "-c", "echo $$; exec sleep 600"], execution_id="to-cancel"), timeout=30
    )
    pid = None
    events = []
    for resp in responses:
        events.append(resp)
        if resp.WhichOneof("event") == "log":
            pid = int(resp.log.data.split()[0])
            stub.CancelExecution(pb.CancelExecutionRequest(execution_id="to-cancel"))
    assert events[-1].result.status == pb.EXECUTION_STATUS_CANCELLED
    assert pid is not None and wait_gone(pid)


def test_cancel_unknown_execution_is_not_found(stub):
    """Cancelling an id the worker does not know is NOT_FOUND, naming it."""
    with pytest.raises(grpc.RpcError) as info:
        stub.CancelExecution(pb.CancelExecutionRequest(execution_id="nope"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "nope" in info.value.details()


def test_client_disconnect_kills_the_action(stub, worker):
    """A client that goes away mid-stream gets its action killed within about a second."""
    responses = stub.Execute(request([SH, "-c", "echo $$; exec sleep 600"]), timeout=30)
    pid = None
    for resp in responses:
        if resp.WhichOneof("event") == "log":
            pid = int(resp.log.data.split()[0])
            break
    responses.cancel()
    assert pid is not None and wait_gone(pid, timeout=3)
    deadline = time.monotonic() + 3
    while worker.server.worker.engine.active_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.server.worker.engine.active_count == 0
    assert action_leftovers(worker.config.execution.work_root) == []


DEEP = "i=0; while [ $i -lt 1100 ]; do mkdir d && cd d || exit 1; i=$((i+1)); done; echo bottom > f"
"""Nests 1100 directories: deeper than a recursive walk or one descriptor per level survives."""


def test_a_tree_nested_deeper_than_any_recursion_is_removed_after_the_action(worker, stub):
    run = execute(stub, request([SH, "-c", DEEP]))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED and run.result.exit_code == 0
    assert action_leftovers(worker.config.execution.work_root) == []


def test_an_output_directory_nested_too_deep_is_an_output_limit_with_the_exit_code(worker, stub):
    run = execute(stub, request([SH, "-c", DEEP], output_directories=["d"]))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED
    assert run.result.exit_code == 0 and "nested deeper than 256 levels" in run.result.message
    assert action_leftovers(worker.config.execution.work_root) == []


def test_outputs_whose_names_are_not_utf8_are_named_in_the_message_and_the_rest_arrive(stub):
    """The API carries UTF-8 paths only: such a file is not collected, the result says which,
    and the exit code and the other outputs arrive as usual."""
    script = "mkdir out && echo ok > out/good && echo bad > \"out/a$(printf '\\377')b\" && exit 3"
    run = execute(stub, request([SH, "-c", script], output_directories=["out"]))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED and run.result.exit_code == 3
    assert bytes(run.outputs["out/good"]) == b"ok\n"
    assert [f.path for f in run.result.output_files] == ["out/good"]
    assert "not UTF-8: 'out/a\\xffb'" in run.result.message, run.result.message


def test_duplicate_running_execution_id_is_already_exists(stub):
    """Two live actions can never share an id."""
    first = stub.Execute(request([SH, "-c", "echo go; sleep 30"], execution_id="dup"), timeout=30)
    for resp in first:
        if resp.WhichOneof("event") == "log":
            break
    with pytest.raises(grpc.RpcError) as info:
        execute(stub, request(["/bin/true"], execution_id="dup"))
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    first.cancel()


def test_worker_environment_is_invisible(stub, monkeypatch):
    """An action sees exactly the environment it asked for, none of the worker's."""
    monkeypatch.setenv("EXPBUILD_SECRET_FOR_TEST", "leak")
    run = execute(stub, request(["/usr/bin/env"], environment={"ONLY": "this"}))
    assert bytes(run.stdout) == b"ONLY=this\n"


def test_outputs_nested_executable_empty_and_symlink(stub):
    """Outputs arrive byte-exact with exec bits, empty files, nested dirs and symlinks as symlinks."""
    script = (
        "mkdir -p out/a/b && printf hello > out/a/b/f.txt && : > out/empty && "
        "printf '#!/bin/sh\\n' > out/tool && chmod +x out/tool && ln -s a/b/f.txt out/link && "
        "mkdir out/emptydir && printf single > single.txt"
    )
    run = execute(
        stub,
        request([SH, "-c", script], output_files=["single.txt", "absent.txt"], output_directories=["out"]),
    )
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    files = {f.path: f for f in run.result.output_files}
    assert sorted(files) == ["out/a/b/f.txt", "out/empty", "out/tool", "single.txt"]
    assert bytes(run.outputs["out/a/b/f.txt"]) == b"hello"
    assert bytes(run.outputs["out/empty"]) == b"" and files["out/empty"].digest.size_bytes == 0
    assert files["out/tool"].is_executable and not files["single.txt"].is_executable
    assert files["single.txt"].digest.sha256 == hashlib.sha256(b"single").hexdigest()
    assert [(s.path, s.target) for s in run.result.output_symlinks] == [("out/link", "a/b/f.txt")]
    assert [d.path for d in run.result.output_directories] == ["out", "out/a", "out/a/b", "out/emptydir"]


def test_output_symlink_pointing_outside_is_not_followed(stub):
    """A command can plant out -> /etc/passwd; the worker reports the link and never reads the file."""
    run = execute(
        stub,
        request(
            [SH, "-c", "ln -s /etc/passwd leak && mkdir d && ln -s /etc d/etc && ln -s /etc dirlink"],
            output_files=["leak", "dirlink/passwd"],
            output_directories=["d"],
        ),
    )
    assert {(s.path, s.target) for s in run.result.output_symlinks} == {
        ("leak", "/etc/passwd"),
        ("d/etc", "/etc"),
    }
    assert run.result.output_files == [] and run.outputs == {}


def test_omit_output_contents_then_read_blob(stub):
    """With omit_output_contents only digests stream; ReadBlob serves the bytes afterwards."""
    run = execute(
        stub, request([SH, "-c", "printf payload > o"], output_files=["o"], omit_output_contents=True)
    )
    assert "output_chunk" not in run.events
    digest = run.result.output_files[0].digest
    data = b"".join(r.data for r in stub.ReadBlob(pb.ReadBlobRequest(digest=digest)))
    assert data == b"payload"


def _upload(stub, data: bytes, chunk: int = 1 << 16) -> pb.Digest:
    digest = pb.Digest(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    pieces = [
        pb.UploadBlobsRequest(digest=digest, offset=i, data=data[i : i + chunk])
        for i in range(0, len(data), chunk)
    ] or [pb.UploadBlobsRequest(digest=digest)]
    resp = stub.UploadBlobs(iter(pieces))
    assert list(resp.stored) == [digest]
    return digest


def _slow_to_stage(stub, execution_id: str) -> pb.ExecuteRequest:
    """An action whose staging takes a while: 300 copies of a 2 MB blob (600 MB)."""
    digest = _upload(stub, os.urandom(2 << 20), chunk=1 << 20)
    inputs = [pb.InputFile(path=f"in/{i}", digest=digest) for i in range(300)]
    return request(["/bin/true"], input_files=inputs, execution_id=execution_id)


def _until_staging(work_root: str) -> None:
    """Wait until an action directory holds staged inputs (staging is under way)."""
    actions = os.path.join(work_root, "actions")
    deadline = time.monotonic() + 10
    while not any(os.path.isdir(os.path.join(actions, d, "in")) for d in os.listdir(actions)):
        assert time.monotonic() < deadline, "staging never began"
        time.sleep(0.002)


def test_a_client_gone_while_inputs_are_staged_leaves_no_directory(worker, stub):
    """Staging runs on a thread; a vanished client stops it at the next file, and the directory
    is removed only once the thread has stopped writing into it."""
    responses = stub.Execute(_slow_to_stage(stub, "gone-while-staging"), timeout=60)
    assert next(responses).WhichOneof("event") == "accepted"
    _until_staging(worker.config.execution.work_root)
    responses.cancel()
    deadline = time.monotonic() + 10
    while worker.server.worker.engine.active_count and time.monotonic() < deadline:
        time.sleep(0.05)
    assert worker.server.worker.engine.active_count == 0
    assert action_leftovers(worker.config.execution.work_root) == []


def test_cancel_while_inputs_are_staged_stops_the_staging(worker, stub):
    responses = stub.Execute(_slow_to_stage(stub, "cancel-while-staging"), timeout=60)
    assert next(responses).WhichOneof("event") == "accepted"
    _until_staging(worker.config.execution.work_root)
    stub.CancelExecution(pb.CancelExecutionRequest(execution_id="cancel-while-staging"))
    result = next(r.result for r in responses if r.WhichOneof("event") == "result")
    assert result.status == pb.EXECUTION_STATUS_CANCELLED
    assert result.message == "stopped while staging inputs"


@pytest.mark.parametrize(
    ("field", "limits"),
    [
        ("cpu_cores", pb.ResourceLimits(cpu_cores=1)),
        ("network", pb.ResourceLimits(network=pb.NETWORK_ACCESS_DISABLED)),
    ],
    ids=["cpu", "no-network"],
)
def test_limits_a_host_cannot_enforce_are_refused_before_accepted(stub, field, limits):
    """With refuse_unenforceable_limits (the default) the refusal comes before `accepted`:
    the action never ran, and the client may safely send it elsewhere."""
    events = []
    with pytest.raises(grpc.RpcError) as info:
        for resp in stub.Execute(request(["/bin/true"], limits=limits), timeout=30):
            events.append(resp.WhichOneof("event"))
    assert events == []
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert info.value.details().startswith(f"limits.{field}="), info.value.details()
    assert "executor 'host' cannot enforce it" in info.value.details()


def test_a_client_gone_while_outputs_stream_is_no_error(stub, caplog):
    """Cancelling while output contents stream ends the call quietly: a warning line at most,
    no error with a traceback."""
    caplog.set_level(logging.INFO)
    script = "head -c 20000000 /dev/zero > big"
    for after in (1, 2, 3, 5, 8, 1, 2, 3, 5, 8):
        responses = stub.Execute(request([SH, "-c", script], output_files=["big"]), timeout=60)
        seen = 0
        for resp in responses:
            seen += resp.WhichOneof("event") == "output_chunk"
            if seen == after:
                responses.cancel()
                break
    time.sleep(0.5)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_blob_uploaded_once_serves_two_actions(stub):
    """A blob referenced by digest is staged for every action that names it, each with its own bit."""
    data = os.urandom(300_000)
    digest = _upload(stub, data)
    assert list(stub.FindMissingBlobs(pb.FindMissingBlobsRequest(digests=[digest])).missing_digests) == []
    for executable in (False, True):
        run = execute(
            stub,
            request(
                [SH, "-c", "sha256sum in/blob | cut -d' ' -f1; test -x in/blob && echo x || echo -"],
                input_files=[pb.InputFile(path="in/blob", digest=digest, is_executable=executable)],
            ),
        )
        lines = bytes(run.stdout).split()
        assert lines[0].decode() == digest.sha256
        assert lines[1] == (b"x" if executable else b"-")


def test_upload_with_wrong_digest_is_refused(stub):
    """Every uploaded blob is verified; a mismatch is INVALID_ARGUMENT and nothing is stored."""
    digest = pb.Digest(sha256=hashlib.sha256(b"right").hexdigest(), size_bytes=5)
    with pytest.raises(grpc.RpcError) as info:
        stub.UploadBlobs(iter([pb.UploadBlobsRequest(digest=digest, data=b"wrong")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert list(stub.FindMissingBlobs(pb.FindMissingBlobsRequest(digests=[digest])).missing_digests) == [
        digest
    ]


def test_missing_input_blob_is_failed_precondition(stub):
    """An input naming a blob the store lacks is refused before anything runs."""
    digest = pb.Digest(sha256="ab" * 32, size_bytes=3)
    with pytest.raises(grpc.RpcError) as info:
        execute(stub, request(["/bin/true"], input_files=[pb.InputFile(path="x", digest=digest)]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "input_files[0].digest" in info.value.details()


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("input_files[0].path", {"input_files": [pb.InputFile(path="../x", content=b"")]}),
        ("input_files[0].path", {"input_files": [pb.InputFile(path="/etc/passwd", content=b"")]}),
        ("input_files[0].path", {"input_files": [pb.InputFile(path="a/../../x", content=b"")]}),
        ("input_files[0].path", {"input_files": [pb.InputFile(path="a\x00b", content=b"")]}),
        ("output_files[0]", {"output_files": ["../escape"]}),
        ("output_directories[0]", {"output_directories": ["/tmp"]}),
        ("working_directory", {"working_directory": "../up"}),
        ("input_symlinks[0].target", {"input_symlinks": [pb.InputSymlink(path="l", target="../../etc")]}),
        ("input_symlinks[0].target", {"input_symlinks": [pb.InputSymlink(path="l", target="/etc/passwd")]}),
        ("argv", {"argv": []}),
        ("execution_id", {"execution_id": "bad id/"}),
        ("limits.memory_bytes", {"limits": pb.ResourceLimits(memory_bytes=-1)}),
        ("executor.name", {"executor": pb.ExecutorSelector(name="warp-drive")}),
        ("input_files[0].path", {"input_files": [pb.InputFile(path="a" * 256, content=b"")]}),
        ("output_directories[0]", {"output_directories": ["/".join(["d"] * 257)]}),
        ("working_directory", {"working_directory": "w/" + "n" * 300}),
        (
            "input_files[0].path",
            {"input_files": [pb.InputFile(path="/".join(["p" * 200] * 16), content=b"")]},
        ),
        (
            "input_symlinks[1].target",
            {
                "input_symlinks": [
                    pb.InputSymlink(path="x", target="."),
                    pb.InputSymlink(path="y", target="x/.."),
                ]
            },
        ),
        ("input_symlinks[0].target", {"input_symlinks": [pb.InputSymlink(path="l", target="t" * 4096)]}),
        ("limits.max_processes", {"limits": pb.ResourceLimits(max_processes=10**7)}),
        ("limits.cpu_cores", {"limits": pb.ResourceLimits(cpu_cores=float("nan"))}),
        ("limits.cpu_cores", {"limits": pb.ResourceLimits(cpu_cores=float("inf"))}),
    ],
    ids=[
        "dotdot",
        "absolute",
        "dotdot-inside",
        "nul",
        "output-dotdot",
        "output-dir-absolute",
        "workdir-dotdot",
        "symlink-escape",
        "symlink-absolute",
        "empty-argv",
        "bad-id",
        "negative-memory",
        "unknown-executor",
        "name-too-long",
        "too-deep",
        "workdir-name-too-long",
        "path-too-long",
        "symlink-through-symlink",
        "symlink-target-too-long",
        "processes-beyond-any-kernel",
        "cpu-nan",
        "cpu-infinite",
    ],
)
def test_bad_requests_are_invalid_argument_naming_the_field(stub, field, kwargs):
    """Path escapes and malformed fields are refused up front with the field named."""
    argv = kwargs.pop("argv", ["/bin/true"])
    req = pb.ExecuteRequest(argv=argv, environment=BASE_ENV, **kwargs)
    with pytest.raises(grpc.RpcError) as info:
        execute(stub, req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_a_limit_above_the_executor_s_maximum_is_refused_up_front(start_worker, tmp_path):
    """The engine refuses it for every executor, naming the limit, before anything runs."""
    worker = start_worker({"executor": {"host": {"type": "host", "max_limits": {"memory_bytes": 1 << 30}}}})
    marker = tmp_path / "ran"
    with pytest.raises(grpc.RpcError) as info:
        execute(
            worker.stub(),
            request([SH, "-c", f"touch {marker}"], limits=pb.ResourceLimits(memory_bytes=2 << 30)),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("limits.memory_bytes:") and "maximum" in info.value.details()
    assert not marker.exists()


@pytest.mark.parametrize(
    ("config", "limits", "timeout", "field"),
    [
        ({"executor": {"host": {"type": "host", "max_limits": {"cpu_cores": 1.0}}}},
         pb.ResourceLimits(cpu_cores=2.0), None, "limits.cpu_cores:"),
        ({"executor": {"host": {"type": "host", "max_limits": {"max_processes": 64}}}},
         pb.ResourceLimits(max_processes=65), None, "limits.max_processes:"),
        ({"executor": {"host": {"type": "host", "max_limits": {"disk_bytes": 1 << 20}}}},
         pb.ResourceLimits(disk_bytes=2 << 20), None, "limits.disk_bytes:"),
        ({"execution": {"default_timeout_seconds": 60.0, "max_timeout_seconds": 60.0}},
         None, Duration(seconds=61), "timeout:"),
    ],
    ids=["cpu", "processes", "disk", "timeout"],
)  # fmt: skip
def test_every_operator_maximum_bounds_what_a_request_may_ask(
    start_worker, tmp_path, config, limits, *, timeout, field
):
    """An operator's maximum is a promise about the machine: a request above it is refused, naming it."""
    worker = start_worker(config)
    marker = tmp_path / "ran"
    req = request([SH, "-c", f"touch {marker}"], limits=limits)
    if timeout is not None:
        req.timeout.CopyFrom(timeout)
    with pytest.raises(grpc.RpcError) as info:
        execute(worker.stub(), req)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field) and "maximum" in info.value.details(), info.value.details()
    assert not marker.exists()


def test_log_cap_truncates_and_says_so(start_worker):
    """Beyond the per-stream cap bytes are counted, not sent, and the result flags it."""
    worker = start_worker({"execution": {"max_log_bytes_per_stream": 1000}})
    run = execute(worker.stub(), request([SH, "-c", "head -c 5000 /dev/zero"]))
    assert len(run.stdout) == 1000
    assert run.result.stdout.size_bytes == 5000 and run.result.stdout.streamed_bytes == 1000
    assert run.result.stdout.truncated and not run.result.stderr.truncated
    assert run.result.message == (
        "stdout truncated: 1000 of 5000 bytes streamed (execution.max_log_bytes_per_stream)"
    )


def test_outputs_too_many_for_one_result_are_an_output_limit(stub):
    """A result must fit one message: a tree of 40,000 files is refused as an output limit, with
    the exit code, instead of a stream that breaks on a message too large."""
    script = "mkdir out && cd out && seq 40000 | xargs touch"
    run = execute(stub, request([SH, "-c", script], output_directories=["out"], omit_output_contents=True))
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED and run.result.exit_code == 0
    assert "pack large trees into one file" in run.result.message


def test_output_cap_is_an_honest_status(start_worker):
    """Outputs over the cap end with OUTPUT_LIMIT_EXCEEDED, the exit code still reported."""
    worker = start_worker({"execution": {"max_output_bytes": 1000}})
    run = execute(
        worker.stub(),
        request([SH, "-c", "head -c 5000 /dev/zero > big; exit 3"], output_files=["big"]),
    )
    assert run.status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED
    assert run.result.exit_code == 3 and "max_output_bytes" in run.result.message
    assert run.result.output_files == []


def test_twenty_concurrent_actions_are_all_correct(start_worker):
    """Concurrent actions never mix their logs or outputs."""
    worker = start_worker({"execution": {"max_concurrent_executions": 8, "max_queued_executions": 32}})
    results: dict[int, object] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = execute(
                worker.stub(),
                request(
                    [SH, "-c", f"printf 'n={i}'; printf 'e={i}' >&2; printf {i} > o; exit {i}"],
                    output_files=["o"],
                ),
            )
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    for i in range(20):
        run = results[i]
        assert bytes(run.stdout) == f"n={i}".encode() and bytes(run.stderr) == f"e={i}".encode()
        assert bytes(run.outputs["o"]) == str(i).encode() and run.result.exit_code == i


def test_full_queue_is_resource_exhausted(start_worker):
    """Past the running slots and the queue, Execute answers RESOURCE_EXHAUSTED at once."""
    worker = start_worker({"execution": {"max_concurrent_executions": 1, "max_queued_executions": 1}})
    s = worker.stub()
    running = s.Execute(request([SH, "-c", "echo go; sleep 30"]), timeout=30)
    for resp in running:
        if resp.WhichOneof("event") == "log":
            break
    queued = s.Execute(request(["/bin/true"]), timeout=30)
    first = next(queued)
    assert first.accepted.queue_position == 1
    with pytest.raises(grpc.RpcError) as info:
        execute(s, request(["/bin/true"]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_queued_executions" in info.value.details()
    running.cancel()
    rest = list(queued)
    result = rest[-1].result
    assert result.status == pb.EXECUTION_STATUS_COMPLETED
    assert result.stats.queue_time.ToNanoseconds() > 0


def test_cancel_while_queued_never_runs(start_worker):
    """A queued action cancelled before its slot ends CANCELLED without starting."""
    worker = start_worker({"execution": {"max_concurrent_executions": 1}})
    s = worker.stub()
    running = s.Execute(request([SH, "-c", "echo go; sleep 30"]), timeout=30)
    for resp in running:
        if resp.WhichOneof("event") == "log":
            break
    queued = s.Execute(request([SH, "-c", "echo ran"], execution_id="waiting"), timeout=30)
    assert next(queued).accepted.queue_position == 1
    time.sleep(0.3)
    s.CancelExecution(pb.CancelExecutionRequest(execution_id="waiting"))
    rest = list(queued)
    assert [r.WhichOneof("event") for r in rest] == ["result"]
    assert rest[0].result.status == pb.EXECUTION_STATUS_CANCELLED
    assert rest[0].result.stats.queue_time.ToMilliseconds() >= 300  # the time it did wait
    running.cancel()


def test_inputs_inline_dirs_symlinks_and_workdir(stub):
    """Inputs are materialised as declared and the command runs in its working directory."""
    run = execute(
        stub,
        request(
            [SH, "-c", "pwd; cat ../data/f; ls -d ../empty; cat ../link; test -x ../data/f && echo x"],
            working_directory="sub/dir",
            input_files=[pb.InputFile(path="sub/data/f", content=b"inline\n", is_executable=True)],
            input_directories=[pb.InputDirectory(path="sub/empty")],
            input_symlinks=[pb.InputSymlink(path="sub/link", target="data/f")],
        ),
    )
    lines = bytes(run.stdout).decode().splitlines()
    assert lines[0].endswith("/sub/dir") and lines[1:] == ["inline", "../empty", "inline", "x"]


def test_inline_input_cap_is_invalid_argument(start_worker):
    """Inline content beyond the cap is refused with a pointer to UploadBlobs."""
    worker = start_worker({"execution": {"max_inline_input_bytes": 10}})
    with pytest.raises(grpc.RpcError) as info:
        execute(
            worker.stub(),
            request(["/bin/true"], input_files=[pb.InputFile(path="f", content=b"x" * 11)]),
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UploadBlobs" in info.value.details()


def test_oversized_request_is_refused_and_worker_survives(start_worker):
    """A request above max_request_bytes is RESOURCE_EXHAUSTED and the worker keeps serving."""
    worker = start_worker({"server": {"max_request_bytes": 100_000}})
    s = worker.stub()
    with pytest.raises(grpc.RpcError) as info:
        execute(s, request(["/bin/true"], stdin=b"x" * 200_000))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert execute(s, request(["/bin/true"])).status == pb.EXECUTION_STATUS_COMPLETED


def test_warmup_and_capabilities_name_the_host_executor(stub):
    """Warmup reports each executor ready; capabilities list limits and caps."""
    warm = stub.Warmup(pb.WarmupRequest())
    assert [(e.name, e.ready) for e in warm.executors] == [("host", True)]
    with pytest.raises(grpc.RpcError) as info:
        stub.Warmup(pb.WarmupRequest(executors=["nope"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "executors[0]" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Warmup(pb.WarmupRequest(images=["ok:1", "NOT A REF"]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("images[1]:")
    twice = stub.Warmup(pb.WarmupRequest(executors=["host", "host"]))
    assert [e.name for e in twice.executors] == ["host"]
    caps = stub.GetCapabilities(pb.GetCapabilitiesRequest())
    assert caps.limits.max_log_bytes_per_stream > 0 and caps.worker_id


def test_stats_report_cpu_memory_and_stage_times(stub):
    """Results carry CPU time and ordered stage timestamps (peak memory: test_worker_process)."""
    busy = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
    run = execute(stub, request([SH, "-c", busy]))
    s = run.result.stats
    assert s.user_cpu_time.ToNanoseconds() > 0
    stamps = [
        s.queued_time,
        s.worker_start_time,
        s.inputs_staged_time,
        s.command_start_time,
        s.command_end_time,
        s.outputs_collected_time,
    ]
    ns = [t.ToNanoseconds() for t in stamps]
    assert all(n > 0 for n in ns) and ns == sorted(ns)
    assert s.wall_time.ToNanoseconds() > 0


def test_hard_linked_output_never_changes_the_outside_file(start_worker, tmp_path):
    """An output hard-linked to a file outside the action is collected by copy; the outside
    file keeps its mode and content. (A command of the worker's own user can make such a link;
    an unprivileged one cannot link a file it does not own, hence run_as_root.)"""
    stub = start_worker({"executor": {"host": {"run_as_root": True}}}).stub()
    outside = tmp_path / "outside.txt"
    outside.write_bytes(b"keep me")
    os.chmod(outside, 0o640)
    run = execute(stub, request([SH, "-c", f"ln {outside} out"], output_files=["out"]))
    assert bytes(run.outputs["out"]) == b"keep me"
    assert outside.stat().st_mode & 0o777 == 0o640 and outside.read_bytes() == b"keep me"


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        (
            "input_directories[0]",
            {
                "input_directories": [pb.InputDirectory(path="a")],
                "input_files": [pb.InputFile(path="a", content=b"")],
            },
        ),
        (
            "working_directory",
            {"working_directory": "f", "input_files": [pb.InputFile(path="f", content=b"")]},
        ),
        (
            "input_files[1].path",
            {"input_files": [pb.InputFile(path="a", content=b""), pb.InputFile(path="a/b", content=b"")]},
        ),
        (
            "input_files[1].path",
            {"input_files": [pb.InputFile(path="x", content=b"1"), pb.InputFile(path="x", content=b"2")]},
        ),
    ],
    ids=["dir-and-file", "workdir-is-file", "file-under-file", "same-file-twice"],
)
def test_conflicting_inputs_are_invalid_argument(stub, field, kwargs):
    """Inputs that cannot all exist at once are refused up front, never half-staged."""
    with pytest.raises(grpc.RpcError) as info:
        execute(stub, request(["/bin/true"], **kwargs))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()


def test_blob_evicted_before_staging_is_an_internal_result(start_worker, tmp_path):
    """A blob that vanishes between admission and staging ends the action with an honest
    INTERNAL result naming it, and the worker keeps serving."""
    worker = start_worker()
    s = worker.stub()
    data = b"soon gone"
    digest = _upload(s, data)
    store = worker.server.worker.store
    original = store.copy_to

    def vanish(d, dest, *, executable):
        store.path_of(d).unlink()
        return original(d, dest, executable=executable)

    store.copy_to = vanish
    try:
        run = execute(s, request(["/bin/true"], input_files=[pb.InputFile(path="in", digest=digest)]))
    finally:
        store.copy_to = original
    assert run.status == pb.EXECUTION_STATUS_INTERNAL
    assert "staging inputs failed" in run.result.message and digest.sha256 in run.result.message
    assert execute(s, request(["/bin/true"])).status == pb.EXECUTION_STATUS_COMPLETED
