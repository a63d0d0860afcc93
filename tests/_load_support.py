"""Shared by the load test and its benchmark: a worker process, actions with known bytes, leak probes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import statistics
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from _support import ServedWorker, is_worker_helper, write_worker_config

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.execution.process import SPARE_CGROUPS

REPO = Path(__file__).resolve().parent.parent
DOCKER_IMAGE = "expbuild/busybox:local"
LABEL_WORKER = "io.expbuild.worker-id"
HOST_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
DOCKER_ENV = {"PATH": "/bin"}
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 32 << 20), ("grpc.max_send_message_length", 32 << 20)]
CALL_DEADLINE = 300.0
"""Seconds any one action's stream may take from call to result under load; past it the worker hung."""
UPLOAD_PIECE = 256 << 10


# ---- bytes a command is told to produce -----------------------------------------------------------


@dataclass(frozen=True)
class Pattern:
    """``size`` bytes of ``line`` and a newline, repeated: what `yes LINE | head -c SIZE` prints."""

    line: str
    size: int

    def data(self) -> bytes:
        unit = (self.line + "\n").encode()
        return (unit * (self.size // len(unit) + 1))[: self.size]

    def sha256(self) -> str:
        return hashlib.sha256(self.data()).hexdigest()

    def shell(self) -> str:
        return f"yes {self.line} | head -c {self.size}"


@dataclass(frozen=True)
class ActionSpec:
    """One action of the load and everything it must produce, computed here, not by the worker."""

    index: int
    execution_id: str
    executor: str
    stdout: Pattern
    stderr: Pattern
    outputs: tuple[tuple[str, Pattern], ...]
    upload: Pattern | None
    exit_code: int
    ending: str
    """"": runs to its end; "cancel": CancelExecution; "disconnect": the client cancels the RPC;
    "timeout": the request's own timeout fires."""
    stop_after: float

    def script(self) -> str:
        lines = [self.stdout.shell(), self.stderr.shell() + " >&2", "mkdir -p out/sub"]
        lines += [f"{p.shell()} > {path}" for path, p in self.outputs]
        if self.upload is not None:
            lines.append("cat in/blob > out/copy")
        if self.ending:
            lines.append("sleep 60")
        lines.append(f"exit {self.exit_code}")
        return "\n".join(lines)

    def request(self, upload_digest: pb.Digest | None) -> pb.ExecuteRequest:
        req = pb.ExecuteRequest(
            execution_id=self.execution_id,
            argv=["/bin/sh", "-c", self.script()],
            environment=DOCKER_ENV if self.executor == "docker" else HOST_ENV,
            output_directories=["out"],
        )
        req.executor.name = self.executor
        req.timeout.FromSeconds(1 if self.ending == "timeout" else 120)
        if upload_digest is not None:
            req.input_files.add(path="in/blob", digest=upload_digest)
        return req

    def expected_outputs(self) -> dict[str, Pattern]:
        found = dict(self.outputs)
        if self.upload is not None:
            found["out/copy"] = self.upload
        return found


def make_specs(
    count: int, *, seed: int, docker_share: float, large_share: float, stop_share: float, large_bytes: int
) -> list[ActionSpec]:
    """A reproducible mix: small and large logs and outputs, uploads, exit codes, stops of three kinds."""
    rng = random.Random(seed)
    run = uuid.uuid4().hex[:8]

    def size(large: bool) -> int:
        if large:
            return rng.randint(large_bytes // 4, large_bytes)
        return rng.choice([0, 1, rng.randint(2, 4096)])

    def line(i: int, what: str) -> str:
        return f"a{i}-{what}-" + "".join(
            rng.choices("abcdefghijklmnopqrstuvwxyz0123456789", k=rng.randint(1, 90))
        )

    specs = []
    for i in range(count):
        large = rng.random() < large_share
        outputs = tuple(
            (path, Pattern(line(i, path.replace("/", "_")), size(large and rng.random() < 0.5)))
            for path in rng.sample(["out/f0", "out/f1", "out/sub/f2", "out/empty"], rng.randint(0, 3))
        )
        ending = ""
        if rng.random() < stop_share:
            ending = rng.choice(["cancel", "cancel", "disconnect", "timeout"])
        specs.append(
            ActionSpec(
                index=i,
                execution_id=f"load-{run}-{i:05d}",
                executor="docker" if rng.random() < docker_share else "host",
                stdout=Pattern(line(i, "out"), size(large)),
                stderr=Pattern(line(i, "err"), size(large and rng.random() < 0.5)),
                outputs=outputs,
                upload=Pattern(line(i, "blob"), rng.randint(1, 1 << 20)) if rng.random() < 0.2 else None,
                exit_code=rng.choice([0, 0, 0, 1, 3]),
                ending=ending,
                stop_after=rng.uniform(0.0, 0.5),
            )
        )
    return specs


# ---- running one action and checking what came back ---------------------------------------------


@dataclass
class Observed:
    """What the client saw of one action, and what was wrong with it."""

    spec: ActionSpec
    kinds: list[str] = field(default_factory=list)
    logs: dict[int, bytearray] = field(
        default_factory=lambda: {pb.LOG_STREAM_STDOUT: bytearray(), pb.LOG_STREAM_STDERR: bytearray()}
    )
    output_sizes: dict[str, int] = field(default_factory=dict)
    output_hashes: dict[str, Any] = field(default_factory=dict)
    result: pb.ExecutionResult | None = None
    rpc_error: str = ""
    problems: list[str] = field(default_factory=list)
    latency: float = 0.0
    uploads: int = 0

    def problem(self, text: str) -> None:
        self.problems.append(
            f"{self.spec.execution_id} ({self.spec.executor}, {self.spec.ending or 'runs'}): {text}"
        )


async def upload(stub: pb_grpc.WorkerServiceStub, pattern: Pattern) -> pb.Digest:
    data = pattern.data()
    digest = pb.Digest(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    missing = await stub.FindMissingBlobs(pb.FindMissingBlobsRequest(digests=[digest]), timeout=60)
    if missing.missing_digests:
        pieces = [
            pb.UploadBlobsRequest(digest=digest, offset=o, data=data[o : o + UPLOAD_PIECE])
            for o in range(0, len(data), UPLOAD_PIECE)
        ]
        await stub.UploadBlobs(iter(pieces), timeout=60)
    return digest


async def run_action(stub: pb_grpc.WorkerServiceStub, spec: ActionSpec) -> Observed:
    """Upload, execute, stop as the spec says, read everything; retry a missing upload at most twice
    (the guide: FAILED_PRECONDITION on Execute means "upload again")."""
    seen = Observed(spec)
    began = time.perf_counter()
    for _attempt in range(3):
        digest = None
        if spec.upload is not None:
            digest = await upload(stub, spec.upload)
            seen.uploads += 1
        seen = Observed(spec, uploads=seen.uploads)
        call = stub.Execute(spec.request(digest), timeout=CALL_DEADLINE)
        stopper: asyncio.Task[None] | None = None
        try:
            async for resp in call:
                kind = resp.WhichOneof("event")
                seen.kinds.append(kind)
                if kind == "accepted" and spec.ending in ("cancel", "disconnect") and stopper is None:
                    stopper = asyncio.ensure_future(_stop_later(stub, call, spec))
                _record(seen, resp)
        except asyncio.CancelledError:
            if not (spec.ending == "disconnect" and call.cancelled()):
                raise
            seen.rpc_error = "CANCELLED: by the client"
        except grpc.aio.AioRpcError as err:
            seen.rpc_error = f"{err.code().name}: {err.details()}"
            if err.code() is grpc.StatusCode.FAILED_PRECONDITION and not seen.kinds and spec.upload:
                continue  # the store evicted the upload before Execute: upload again
        finally:
            if stopper is not None:
                stopper.cancel()
                with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                    await stopper
        break
    seen.latency = time.perf_counter() - began
    check(seen)
    return seen


async def _stop_later(stub: pb_grpc.WorkerServiceStub, call: Any, spec: ActionSpec) -> None:
    await asyncio.sleep(spec.stop_after)
    if spec.ending == "disconnect":
        call.cancel()
        return
    try:
        await stub.CancelExecution(pb.CancelExecutionRequest(execution_id=spec.execution_id), timeout=60)
    except grpc.aio.AioRpcError as err:
        if err.code() is not grpc.StatusCode.NOT_FOUND:  # it can only be gone if the stream ended
            raise


def _record(seen: Observed, resp: pb.ExecuteResponse) -> None:
    kind = resp.WhichOneof("event")
    if seen.result is not None:
        seen.problem(f"event {kind} after the result")
    if kind == "log":
        buf = seen.logs.get(resp.log.stream)
        if buf is None:
            seen.problem(f"log chunk of unknown stream {resp.log.stream}")
            return
        if resp.log.offset != len(buf):
            seen.problem(f"log stream {resp.log.stream}: chunk at {resp.log.offset}, expected {len(buf)}")
        buf.extend(resp.log.data)
    elif kind == "output_chunk":
        c = resp.output_chunk
        if c.offset != seen.output_sizes.get(c.path, 0):
            seen.problem(f"output {c.path}: chunk at {c.offset}, expected {seen.output_sizes.get(c.path, 0)}")
        seen.output_sizes[c.path] = c.offset + len(c.data)
        seen.output_hashes.setdefault(c.path, hashlib.sha256()).update(c.data)
    elif kind == "result":
        seen.result = resp.result


def check(seen: Observed) -> None:
    """Everything the client relies on: one result last, logs and outputs byte-exact, the right status."""
    spec = seen.spec
    if spec.ending == "disconnect":
        if seen.result is None and "CANCELLED" not in seen.rpc_error:
            seen.problem(f"disconnect ended {seen.rpc_error!r}")
        return  # no result to expect: the client stopped listening
    if seen.rpc_error:
        seen.problem(f"RPC failed after {seen.kinds[-3:]}: {seen.rpc_error}")
        return
    if not seen.kinds or seen.kinds[0] != "accepted":
        seen.problem(f"first event {seen.kinds[:1]}")
    if seen.kinds.count("result") != 1 or seen.kinds[-1] != "result":
        seen.problem(f"{seen.kinds.count('result')} results, last event {seen.kinds[-1:]}")
        return
    result = seen.result
    assert result is not None
    if result.execution_id != spec.execution_id:
        seen.problem(f"result for {result.execution_id!r}")
    if result.executor != spec.executor:
        seen.problem(f"ran on {result.executor!r}")
    status = pb.ExecutionStatus.Name(result.status)
    out, err = bytes(seen.logs[pb.LOG_STREAM_STDOUT]), bytes(seen.logs[pb.LOG_STREAM_STDERR])
    if spec.ending in ("cancel", "timeout"):
        want = "EXECUTION_STATUS_CANCELLED" if spec.ending == "cancel" else "EXECUTION_STATUS_TIMED_OUT"
        if status != want:
            seen.problem(f"status {status} ({result.message!r}), expected {want}")
        for name, got, pattern in (("stdout", out, spec.stdout), ("stderr", err, spec.stderr)):
            if not pattern.data().startswith(got):
                seen.problem(f"{name}: {len(got)} bytes that are not a prefix of what the command wrote")
        return
    if status != "EXECUTION_STATUS_COMPLETED" or result.exit_code != spec.exit_code:
        seen.problem(
            f"status {status} exit {result.exit_code} ({result.message!r}), expected exit {spec.exit_code}"
        )
        return
    for name, got, pattern, summary in (
        ("stdout", out, spec.stdout, result.stdout),
        ("stderr", err, spec.stderr, result.stderr),
    ):
        if hashlib.sha256(got).hexdigest() != pattern.sha256():
            seen.problem(f"{name}: {len(got)} bytes received, {pattern.size} written, sha256 differs")
        if (summary.size_bytes, summary.streamed_bytes, summary.truncated) != (pattern.size, len(got), False):
            seen.problem(f"{name} summary {summary.size_bytes}/{summary.streamed_bytes}/{summary.truncated}")
    expected = spec.expected_outputs()
    manifest = {f.path: f.digest for f in result.output_files}
    if set(manifest) != set(expected):
        seen.problem(f"outputs {sorted(manifest)}, expected {sorted(expected)}")
    for path, pattern in expected.items():
        digest = manifest.get(path)
        if digest is None:
            continue
        streamed = seen.output_hashes.get(path, hashlib.sha256()).hexdigest()
        want = (pattern.sha256(), pattern.size)
        if (digest.sha256, digest.size_bytes) != want:
            seen.problem(f"output {path}: manifest digest {digest.sha256[:12]}/{digest.size_bytes} is wrong")
        if (streamed, seen.output_sizes.get(path, 0)) != want:
            seen.problem(f"output {path}: streamed bytes differ from what the command wrote")
    dirs = {d.path for d in result.output_directories}
    if not {"out", "out/sub"} <= dirs:
        seen.problem(f"output directories {sorted(dirs)}")


# ---- the load --------------------------------------------------------------------------------------


@dataclass
class LoadReport:
    observed: list[Observed]
    elapsed: float

    @property
    def problems(self) -> list[str]:
        found = [p for seen in self.observed for p in seen.problems]
        ids = Counter(seen.spec.execution_id for seen in self.observed)
        found += [f"{i}: ran {n} times" for i, n in ids.items() if n != 1]
        return found

    def percentiles(self) -> dict[str, float]:
        latencies = sorted(s.latency for s in self.observed if not s.spec.ending)
        if len(latencies) < 2:
            return {}
        q = statistics.quantiles(latencies, n=100, method="inclusive")
        return {"p50": q[49], "p90": q[89], "p99": q[98], "max": latencies[-1]}

    def summary(self) -> str:
        ends = Counter(
            pb.ExecutionStatus.Name(s.result.status).removeprefix("EXECUTION_STATUS_")
            if s.result
            else "no result"
            for s in self.observed
        )
        by_executor = Counter(s.spec.executor for s in self.observed)
        moved = sum(len(b) for s in self.observed for b in s.logs.values()) + sum(
            n for s in self.observed for n in s.output_sizes.values()
        )
        pct = " ".join(f"{k} {v * 1e3:.0f} ms" for k, v in self.percentiles().items())
        return (
            f"{len(self.observed)} actions ({dict(by_executor)}) in {self.elapsed:.1f} s: "
            f"{len(self.observed) / self.elapsed:.1f} actions/s, "
            f"{moved / self.elapsed / 1e6:.1f} MB/s of logs and outputs; endings {dict(ends)}; "
            f"latency of actions run to their end: {pct}"
        )


async def run_load(target: str, specs: list[ActionSpec], clients: int) -> LoadReport:
    """``clients`` clients, each on its own channel, take the next action until none is left."""
    queue: asyncio.Queue[ActionSpec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)
    observed: list[Observed] = []

    async def client() -> None:
        async with grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
            stub = pb_grpc.WorkerServiceStub(channel)
            while not queue.empty():
                observed.append(await run_action(stub, queue.get_nowait()))

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return LoadReport(observed, time.perf_counter() - began)


# ---- the worker as a separate process, and what it leaves behind -----------------------------------


def docker_engine_answers() -> bool:
    try:
        import docker

        client = docker.from_env(timeout=10)
        try:
            client.ping()
        finally:
            client.close()
    except Exception:
        return False
    return True


def build_docker_image() -> str:
    """The local busybox image (scripts/build-test-image.sh: no registry involved)."""
    subprocess.run(
        ["bash", str(REPO / "scripts" / "build-test-image.sh"), DOCKER_IMAGE],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return DOCKER_IMAGE


@dataclass(frozen=True)
class Snapshot:
    """What the worker process holds at one moment."""

    rss_kib: int
    hwm_kib: int
    threads: int
    fds: Counter[str]
    children: frozenset[int]

    def fd_count(self) -> int:
        return sum(self.fds.values())


def _fd_kind(target: str, work: Path) -> str:
    if target.startswith(str(work)):
        return "file in the work root"
    for prefix in (
        "socket:",
        "pipe:",
        "anon_inode:[pidfd]",
        "anon_inode:[eventfd]",
        "anon_inode:[eventpoll]",
    ):
        if target.startswith(prefix):
            return prefix.rstrip(":")
    if target.startswith("anon_inode:"):
        return "anon_inode"
    return "other"


class WorkerProcess(ServedWorker):
    """``expbuild-worker serve`` in a child process on 127.0.0.1, port 0; stopped by its pid."""

    def __init__(
        self, work: Path, *, docker_image: str | None, concurrency: int, queued: int, store_bytes: int
    ) -> None:
        self.work = work
        self.worker_id = f"load-{uuid.uuid4().hex[:12]}"
        self.work_root = work / "work"
        self.store = work / "cas"
        config: dict[str, dict[str, Any]] = {
            "server": {
                "address": "127.0.0.1",
                "port": 0,
                "shutdown_grace_seconds": 0.0,
                "log_level": "warning",
                "worker_id": self.worker_id,
            },
            "execution": {
                "work_root": str(self.work_root),
                "max_concurrent_executions": concurrency,
                "max_queued_executions": queued,
                "max_log_bytes_per_stream": 64 << 20,
            },
            "storage": {"path": str(self.store), "max_bytes": store_bytes},
            "executor.host": {"type": "host", "kill_grace_seconds": 0.5},
        }
        if docker_image is not None:
            config["executor.docker"] = {
                "type": "docker",
                "image": docker_image,
                "pull_policy": "never",
                "kill_grace_seconds": 0.5,
            }
        super().__init__(write_worker_config(work / "worker.toml", config))

    def snapshot(self) -> Snapshot:
        status = {
            k: v.split()[0]
            for k, _, v in (
                line.partition(":") for line in Path(f"/proc/{self.pid}/status").read_text().splitlines()
            )
            if v.strip()
        }
        fds: Counter[str] = Counter()
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                fds[_fd_kind(os.readlink(f"/proc/{self.pid}/fd/{fd}"), self.work)] += 1
        children: set[int] = set()
        for task in os.listdir(f"/proc/{self.pid}/task"):
            with contextlib.suppress(FileNotFoundError):
                children.update(
                    int(x) for x in Path(f"/proc/{self.pid}/task/{task}/children").read_text().split()
                )
        helpers = {pid for pid in children if is_worker_helper(pid)}
        # Each helper placed ahead of need holds one socket of the worker's; how many wait at a
        # moment depends on where the spares are between their low and high water marks.
        fds["socket"] -= len(helpers)
        return Snapshot(
            rss_kib=int(status["VmRSS"]),
            hwm_kib=int(status["VmHWM"]),
            threads=len(os.listdir(f"/proc/{self.pid}/task")),
            fds=fds,
            children=frozenset(children - helpers),
        )

    def action_directories(self) -> list[str]:
        """Non-empty action directories, and more empty ones than the spares kept ahead of need."""
        from expbuild_worker.engine._workdirs import SPARE_DIRECTORIES

        root = self.work_root / "actions"
        entries = sorted(os.listdir(root)) if root.exists() else []
        if len(entries) > SPARE_DIRECTORIES:
            return entries
        return [e for e in entries if os.listdir(root / e)]

    def store_temporaries(self) -> list[str]:
        tmp = self.store / "tmp"
        return sorted(os.listdir(tmp)) if tmp.exists() else []

    def cgroups(self) -> dict[str, list[str]]:
        """This worker's action cgroups per hierarchy and executor (host spares included)."""
        found: dict[str, list[str]] = {}
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            base = hierarchy / "expbuild" / self.worker_id
            if not base.is_dir():
                continue
            for executor in base.iterdir():
                if executor.is_dir():
                    found[f"{hierarchy}/{executor.name}"] = sorted(
                        p.name for p in executor.iterdir() if p.is_dir()
                    )
        return found

    def cgroup_leftovers(self) -> list[str]:
        """Action cgroups beyond the host executor's spares, and any Docker action's parent cgroup."""
        leftovers = []
        for where, names in self.cgroups().items():
            allowed = SPARE_CGROUPS if where.endswith("/host") else 0  # at most the high water mark
            if len(names) > allowed:
                leftovers.append(f"{where}: {len(names)} cgroups {names[:5]}")
        return leftovers

    def containers(self) -> list[str]:
        out = subprocess.run(
            ["docker", "ps", "-a", "-q", "--filter", f"label={LABEL_WORKER}={self.worker_id}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        return out.stdout.split()


def settle(probe: Any, *, seconds: float = 15.0) -> Any:
    """Poll ``probe`` until it returns something falsy or ``seconds`` pass; returns its last answer."""
    deadline = time.monotonic() + seconds
    while (found := probe()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return found


def leaks(worker: WorkerProcess, baseline: Snapshot, *, docker: bool) -> tuple[list[str], Snapshot]:
    """What the worker holds now that it did not hold at ``baseline`` (both taken while idle)."""
    found: list[str] = []
    children = settle(lambda: worker.snapshot().children)
    if children:
        found.append(f"child processes left: {sorted(children)}")
    dirs = settle(worker.action_directories)
    if dirs:
        found.append(f"action directories left: {dirs[:5]} ({len(dirs)})")
    tmp = settle(worker.store_temporaries)
    if tmp:
        found.append(f"half-written blobs left in the store: {len(tmp)}")
    cgroups = settle(worker.cgroup_leftovers)
    if cgroups:
        found.append(f"cgroups left: {cgroups}")
    if docker:
        containers = settle(worker.containers)
        if containers:
            found.append(f"containers left: {containers}")

    def grown() -> list[str]:
        now = worker.snapshot()
        more = [
            f"{kind}: {now.fds[kind]} fds, {baseline.fds[kind]} before"
            for kind in now.fds
            if kind != "socket" and now.fds[kind] > baseline.fds[kind]
        ]
        if now.fds["socket"] > baseline.fds["socket"] + SOCKET_SLACK:
            more.append(f"sockets: {now.fds['socket']}, {baseline.fds['socket']} before")
        if now.threads > baseline.threads + THREAD_SLACK:
            more.append(f"threads: {now.threads}, {baseline.threads} before")
        return more

    found += settle(grown)
    return found, worker.snapshot()


SOCKET_SLACK = 10
"""Sockets the worker may hold beyond the baseline: the Docker client's connection pool (at most 10
connections to the engine) may still be filling when the baseline is taken; clients' are all closed."""
THREAD_SLACK = min(32, (os.cpu_count() or 1) + 4)
"""Threads beyond the baseline: asyncio's default executor grows up to min(32, CPUs + 4) and keeps them."""


@contextlib.contextmanager
def worker_process(work: Path, **kwargs: Any) -> Iterator[WorkerProcess]:
    worker = WorkerProcess(work, **kwargs)
    try:
        yield worker
    finally:
        worker.stop()


def after_stop(worker: WorkerProcess, *, docker: bool) -> list[str]:
    """Once the worker has exited: its cgroup directories, containers and action directories are gone."""
    found = []
    cgroups = settle(worker.cgroups, seconds=5)
    if cgroups:
        found.append(f"cgroup directories left after exit: {cgroups}")
    if docker and (containers := worker.containers()):
        found.append(f"containers left after exit: {containers}")
    root = worker.work_root / "actions"
    if root.exists() and os.listdir(root):
        found.append(f"action directories left after exit: {len(os.listdir(root))}")
    return found
