"""Test helpers: run an action through a real channel and reassemble what the stream carried."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.engine._workdirs import SPARE_DIRECTORIES
from expbuild_worker.execution.process._spawner import PROGRAM as SPAWNER_PROGRAM

BASE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}


@dataclass
class Run:
    """Everything one Execute stream delivered, reassembled and checked for order."""

    events: list[str] = field(default_factory=list)
    stdout: bytearray = field(default_factory=bytearray)
    stderr: bytearray = field(default_factory=bytearray)
    outputs: dict[str, bytearray] = field(default_factory=dict)
    output_sha256: dict[str, str] = field(default_factory=dict)
    accepted: pb.ExecutionAccepted | None = None
    result: pb.ExecutionResult | None = None
    first_log_at: float | None = None
    keep_outputs: bool = True

    @property
    def status(self) -> int:
        assert self.result is not None
        return self.result.status


def request(argv: list[str], **kwargs: Any) -> pb.ExecuteRequest:
    env = kwargs.pop("environment", BASE_ENV)
    return pb.ExecuteRequest(argv=argv, environment=env, **kwargs)


def consume(responses: Any, *, keep_outputs: bool = True, on_log: Any = None) -> Run:
    """Read a whole stream; assert offsets are contiguous and the result comes last, once."""
    run = Run(keep_outputs=keep_outputs)
    hashes: dict[str, Any] = {}
    sizes: dict[str, int] = {}
    for resp in responses:
        kind = resp.WhichOneof("event")
        assert run.result is None, f"event {kind} after the result"
        run.events.append(kind)
        if kind == "accepted":
            run.accepted = resp.accepted
        elif kind == "log":
            if run.first_log_at is None:
                run.first_log_at = time.time()
            buf = run.stdout if resp.log.stream == pb.LOG_STREAM_STDOUT else run.stderr
            assert resp.log.offset == len(buf), "log chunks must be contiguous"
            buf.extend(resp.log.data)
            if on_log is not None:
                on_log(resp.log)
        elif kind == "output_chunk":
            chunk = resp.output_chunk
            assert chunk.offset == sizes.get(chunk.path, 0), "output chunks must be contiguous"
            sizes[chunk.path] = chunk.offset + len(chunk.data)
            hashes.setdefault(chunk.path, hashlib.sha256()).update(chunk.data)
            if keep_outputs:
                run.outputs.setdefault(chunk.path, bytearray()).extend(chunk.data)
        elif kind == "result":
            run.result = resp.result
    assert run.result is not None, "stream ended without a result"
    assert run.events[0] == "accepted"
    for f in run.result.output_files:
        h = hashes.get(f.path, hashlib.sha256())
        run.output_sha256[f.path] = h.hexdigest()
        if keep_outputs:
            run.outputs.setdefault(f.path, bytearray())
    return run


def execute(stub: pb_grpc.WorkerServiceStub, req: pb.ExecuteRequest, **kwargs: Any) -> Run:
    return consume(stub.Execute(req, timeout=kwargs.pop("timeout", 60)), **kwargs)


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone before open, or between open and read
        return False


def is_spawner(pid: int) -> bool:
    """Whether ``pid`` is an executor's spawner: a helper that lives as long as its executor, not
    a process of any action."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return SPAWNER_PROGRAM.encode() in fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def action_leftovers(work_root: str, *, timeout: float = 3.0) -> list[str]:
    """What is left under ``work_root/actions`` once finished actions' directories had ``timeout``
    seconds to go: [] when nothing leaked (fresh, empty spares are made ahead of need)."""
    actions = os.path.join(work_root, "actions")

    def leftovers() -> list[str]:
        entries = os.listdir(actions)
        if len(entries) > SPARE_DIRECTORIES:
            return entries
        return [d for d in entries if os.listdir(os.path.join(actions, d))]

    deadline = time.monotonic() + timeout
    while (found := leftovers()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found
