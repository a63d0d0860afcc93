"""Test helpers: run an action through a real channel and reassemble what the stream carried."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.engine._workdirs import SPARE_DIRECTORIES
from expbuild_worker.execution.proc_stat import PARENT, STATE, stat_fields
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


def is_worker_helper(pid: int) -> bool:
    """Whether ``pid`` is an executor's own helper, not a process of any action: its spawner
    process, or a native helper placed ahead of need that waits for its command (once, or,
    resident in a reused cgroup, for each command there)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return SPAWNER_PROGRAM.encode() in cmdline or any(
        role in cmdline for role in (b"\0--placed\0", b"\0--resident\0")
    )


def children(parent: int) -> dict[int, bytes]:
    """``parent``'s children, each with its state (/proc/PID/stat: b"Z" for one never reaped)."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and int(fields[PARENT]) == parent:
                found[int(entry)] = fields[STATE]
    return found


def placed_children(parent: int) -> set[int]:
    """``parent``'s children that wait for a command: native helpers placed ahead of need (the
    worker's own children), or forks of the spawner (the spawner's)."""
    return {pid for pid in children(parent) if is_worker_helper(pid)}


def wait_until(predicate: Callable[[], Any], seconds: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it holds or ``seconds`` have passed; whether it held at the end."""
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return bool(predicate())
        time.sleep(interval)
    return True


def wait_gone(pid: int, timeout: float = 5.0) -> bool:
    return wait_until(lambda: not pid_alive(pid), timeout)


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


# ---- the worker as operators run it: ``expbuild-worker serve`` in a child process --------------


def write_worker_config(path: Path, config: dict[str, dict[str, Any]]) -> Path:
    """Write ``config`` (table name -> keys, e.g. ``"executor.host"``) as a worker's TOML file;
    values are written as JSON, which TOML reads the same."""
    path.write_text(
        "".join(
            f"[{table}]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())
            for table, values in config.items()
        )
    )
    return path


class ServedWorker:
    """``expbuild-worker serve --config <config>`` in a child process, once it listens; its stderr
    goes to ``<config>.log`` (a pipe nobody reads would block a talkative worker)."""

    def __init__(self, config: Path) -> None:
        self.log = config.with_suffix(".log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "expbuild_worker", "serve", "--config", str(config)],
                stdout=subprocess.PIPE,
                stderr=log,
            )
        self.pid = self.proc.pid
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("expbuild-worker listening on "):
            self.stop()
            raise AssertionError(f"the worker did not start: {line!r} {self.log.read_text()[-4000:]}")
        self.target = line.rsplit(" ", 1)[1].strip()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM by pid, then SIGKILL if it does not exit within ``timeout``; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


class WorkerProcess(ServedWorker):
    """A worker process with only the host executor, its work root under ``tmp_path/work``."""

    def __init__(
        self, tmp_path: Path, *, grace: float = 1.0, execution: dict[str, Any] | None = None
    ) -> None:
        self.work_root = tmp_path / "work"
        config = {
            "server": {
                "address": "127.0.0.1",
                "port": 0,
                "worker_id": f"proc-{uuid.uuid4().hex[:12]}",
                "shutdown_grace_seconds": grace,
            },
            "execution": {"work_root": str(self.work_root), **(execution or {})},
            "executor.host": {"type": "host", "kill_grace_seconds": 0.5},
        }
        super().__init__(write_worker_config(tmp_path / "worker.toml", config))

    def vm_hwm_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise AssertionError("no VmHWM")


# ---- tools a test needs: present, skipped, or (where demanded) a failure -------------------------


def required(flag: str) -> bool:
    """Whether CI=true or ``flag``=1 demands the tool ``flag`` names."""
    return os.environ.get("CI") == "true" or os.environ.get(flag) == "1"


def unavailable(reason: str, *, flag: str, demanded: bool | None = None) -> NoReturn:
    """Skip where the tool is optional; fail where CI=true or ``flag``=1 (or ``demanded``) demands it."""
    import pytest  # here: the benchmarks import this module too

    if required(flag) if demanded is None else demanded:
        pytest.fail(f"required here (CI=true or {flag}=1): {reason}")
    pytest.skip(reason)


def static_busybox() -> Path | None:
    """The static busybox (Debian's busybox-static) a FROM-scratch image can run, if installed."""
    for candidate in ("/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate):
            head = Path(candidate).read_bytes()[:4096]
            if head.startswith(b"\x7fELF") and b"ld-linux" not in head and b"ld-musl" not in head:
                return Path(candidate)
    return None


def docker_client_or_unavailable() -> Any:
    """A client of the local Docker engine once it answers; else skip (or fail where
    CI=true or EXPBUILD_REQUIRE_DOCKER=1). The caller closes it."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as err:
        unavailable(f"no Docker engine answers: {err}", flag="EXPBUILD_REQUIRE_DOCKER")
    return client


def build_busybox_image(client: Any, context: Path, tag: str) -> str:
    """Build ``tag``: FROM scratch, the static busybox and its applet links, in ``context`` (an
    empty directory), never pulled. Without a static busybox: skip, or fail where Docker is required."""
    busybox = static_busybox()
    if busybox is None:
        unavailable(
            "no static busybox (install busybox-static) to build the test image from",
            flag="EXPBUILD_REQUIRE_DOCKER",
        )
    shutil.copy2(busybox, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    client.images.build(
        path=str(context), tag=tag, rm=True, forcerm=True, pull=False, labels={"io.expbuild.project": "tests"}
    )
    return tag
