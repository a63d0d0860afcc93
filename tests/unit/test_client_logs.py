"""LogReassembler and the exec command's pure parts: sizes, requests, exit codes."""

from __future__ import annotations

import argparse

import pytest

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.cli import build_parser
from expbuild_worker.cli._client import (
    DEFAULT_PATH,
    EXIT_CANCELLED,
    EXIT_FAILED_TO_START,
    EXIT_INFRASTRUCTURE,
    EXIT_OOM_KILLED,
    EXIT_OUTPUT_LIMIT,
    EXIT_TIMED_OUT,
    build_request,
    exit_status,
    parse_memory,
)
from expbuild_worker.client import LogReassembler
from expbuild_worker.errors import UnavailableError

OUT, ERR = pb.LOG_STREAM_STDOUT, pb.LOG_STREAM_STDERR


def test_streams_are_reassembled_independently() -> None:
    """Each stream has its own offsets; interleaving never mixes their bytes."""
    logs = LogReassembler()
    assert logs.feed(pb.LogChunk(stream=OUT, offset=0, data=b"ab")) == b"ab"
    assert logs.feed(pb.LogChunk(stream=ERR, offset=0, data=b"E")) == b"E"
    assert logs.feed(pb.LogChunk(stream=OUT, offset=2, data=b"c")) == b"c"
    assert (logs.received(OUT), logs.received(ERR)) == (3, 1)


def test_overlap_is_trimmed() -> None:
    """A resent chunk never prints bytes twice."""
    logs = LogReassembler()
    logs.feed(pb.LogChunk(stream=OUT, offset=0, data=b"abc"))
    assert logs.feed(pb.LogChunk(stream=OUT, offset=1, data=b"bcde")) == b"de"
    assert logs.feed(pb.LogChunk(stream=OUT, offset=0, data=b"abc")) == b""


def test_gap_is_an_error() -> None:
    """Lost bytes are reported, not papered over."""
    logs = LogReassembler()
    with pytest.raises(UnavailableError, match="gap"):
        logs.feed(pb.LogChunk(stream=ERR, offset=5, data=b"x"))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1048576", 1 << 20),
        ("512M", 512 << 20),
        ("2G", 2 << 30),
        ("2g", 2 << 30),
        ("1.5GiB", 3 << 29),
        ("64k", 64 << 10),
    ],
)
def test_memory_sizes(text: str, value: int) -> None:
    """--memory takes plain bytes or binary-suffixed sizes, as Docker's --memory does."""
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "M", "12X", "-1", "0"])
def test_bad_memory_sizes(text: str) -> None:
    """A size that means nothing is a usage error, not a silent zero."""
    with pytest.raises(argparse.ArgumentTypeError):
        parse_memory(text)


def test_explicit_path_replaces_the_default() -> None:
    """--env PATH=... is the whole PATH: the default never mixes in."""
    args = build_parser().parse_args(["exec", "--target", "t:1", "--env", "PATH=/opt/bin", "--", "x"])
    assert dict(build_request(args, ["x"]).environment) == {"PATH": "/opt/bin"}


def test_flags_become_the_request() -> None:
    """Every exec flag lands in its ExecuteRequest field; the command is taken after --."""
    args = build_parser().parse_args(
        [
            "exec", "--target", "127.0.0.1:1", "--executor", "docker", "--image", "busybox:local",
            "--timeout", "2.5", "--cpus", "1.5", "--memory", "512M", "--env", "A=1", "--env", "B=x=y",
            "--output", "out/file", "--output", "dir/", "--workdir", "w", "--", "sh", "-c", "echo --env",
        ]
    )  # fmt: skip
    argv = args.argv[1:]
    assert argv == ["sh", "-c", "echo --env"]
    req = build_request(args, argv)
    assert list(req.argv) == argv
    assert dict(req.environment) == {"PATH": DEFAULT_PATH, "A": "1", "B": "x=y"}
    assert req.executor.name == "docker" and req.container_image == "busybox:local"
    assert req.timeout.ToNanoseconds() == 2_500_000_000
    assert req.limits.cpu_cores == 1.5 and req.limits.memory_bytes == 512 << 20
    assert list(req.output_files) == ["out/file"]
    assert list(req.output_directories) == ["out/file", "dir"]
    assert req.working_directory == "w"


@pytest.mark.parametrize(
    ("status", "exit_code", "signal", "expected"),
    [
        (pb.EXECUTION_STATUS_COMPLETED, 0, 0, 0),
        (pb.EXECUTION_STATUS_COMPLETED, 255, 0, 255),
        (pb.EXECUTION_STATUS_COMPLETED, 0, 9, 137),
        (pb.EXECUTION_STATUS_TIMED_OUT, 0, 15, EXIT_TIMED_OUT),
        (pb.EXECUTION_STATUS_CANCELLED, 0, 0, EXIT_CANCELLED),
        (pb.EXECUTION_STATUS_OOM_KILLED, 0, 9, EXIT_OOM_KILLED),
        (pb.EXECUTION_STATUS_FAILED_TO_START, 0, 0, EXIT_FAILED_TO_START),
        (pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED, 0, 0, EXIT_OUTPUT_LIMIT),
        (pb.EXECUTION_STATUS_INTERNAL, 0, 0, EXIT_INFRASTRUCTURE),
    ],
    ids=[
        "ok",
        "exit-255",
        "sigkill",
        "timeout",
        "cancelled",
        "oom",
        "failed-to-start",
        "output-limit",
        "internal",
    ],
)
def test_exit_codes(status: pb.ExecutionStatus, exit_code: int, signal: int, expected: int) -> None:
    """Scripts can tell every outcome apart by exit code; only non-command codes get a stderr line."""
    code, line = exit_status(pb.ExecutionResult(status=status, exit_code=exit_code, signal=signal))
    assert code == expected
    if status == pb.EXECUTION_STATUS_COMPLETED and not signal:
        assert line is None
    else:
        assert line is not None and pb.ExecutionStatus.Name(status).removeprefix("EXECUTION_STATUS_") in line
