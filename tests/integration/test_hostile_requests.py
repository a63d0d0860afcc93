"""Random and adversarial requests against a live worker: every one answered, refusals documented."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from _support import action_leftovers, is_worker_helper, pid_alive
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc

CALL_DEADLINE = 30.0
"""Seconds any single call may take; a call still open then means the worker hung on it."""
HEALTH_DEADLINE = 10.0
INLINE_CAP = 4096
INPUT_ENTRIES_CAP = 256
STORE_BYTES = 8 << 20
MAX_TIMEOUT = 600
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

SC = grpc.StatusCode
DOCUMENTED = {
    "Execute": {SC.INVALID_ARGUMENT, SC.FAILED_PRECONDITION, SC.RESOURCE_EXHAUSTED, SC.ALREADY_EXISTS},
    "UploadBlobs": {SC.INVALID_ARGUMENT, SC.RESOURCE_EXHAUSTED},
    "FindMissingBlobs": {SC.INVALID_ARGUMENT},
    "ReadBlob": {SC.INVALID_ARGUMENT, SC.NOT_FOUND},
    "CancelExecution": {SC.INVALID_ARGUMENT, SC.NOT_FOUND},
    "Warmup": {SC.INVALID_ARGUMENT},
}
"""The statuses the API guide documents for refusing each call (UNAVAILABLE only while shutting down)."""

HYPOTHESIS = {
    "deadline": None,
    "derandomize": True,
    "database": None,
    "phases": (Phase.explicit, Phase.generate, Phase.shrink),
    "suppress_health_check": list(HealthCheck),
}
"""Reproducible in CI: examples derive from the test's name, nothing is read from or saved to a database."""

WORKER_CONFIG = {
    "execution": {
        "max_inline_input_bytes": INLINE_CAP,
        "max_input_entries": INPUT_ENTRIES_CAP,
        "max_digests_per_request": 64,
        "max_timeout_seconds": MAX_TIMEOUT,
        "default_timeout_seconds": 30,
        "max_queued_executions": 8,
    },
    "storage": {"max_bytes": STORE_BYTES},
}


# ---- what a call must end with -------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """What a request must get: accepted (``codes`` empty) or refused with one of ``codes`` and a
    message containing one of ``needles`` (the offending field or value); ``may_accept`` allows both."""

    codes: frozenset[grpc.StatusCode] = frozenset()
    needles: tuple[str, ...] = ()
    may_accept: bool = False
    note: str = "valid"


def refused(note: str, *needles: str, code: grpc.StatusCode = SC.INVALID_ARGUMENT) -> Expect:
    return Expect(frozenset({code}), needles, note=note)


def check_refusal(method: str, err: grpc.RpcError, expect: Expect, what: Any) -> None:
    code, details = err.code(), err.details() or ""
    assert code is not SC.DEADLINE_EXCEEDED, f"{method} hung: no answer within {CALL_DEADLINE}s to {what!r}"
    assert code in DOCUMENTED[method], f"{method} ended {code.name} (undocumented): {details!r} for {what!r}"
    assert expect.codes, f"{method} refused a valid request ({expect.note}) with {code.name}: {details!r}"
    assert code in expect.codes, f"{method} ({expect.note}): {code.name} {details!r}, expected {expect.codes}"
    assert any(n in details for n in expect.needles), (
        f"{method} ({expect.note}): message {details!r} names none of {expect.needles}"
    )


def healthy(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_DEADLINE).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def children_of(pid: int) -> set[int]:
    """Live (not zombie) child processes of ``pid``, across all its threads."""
    found: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        except FileNotFoundError:
            continue
        found.update(int(x) for x in text.split())
    return {p for p in found if pid_alive(p) and not is_worker_helper(p)}


def nothing_left_behind(worker: Any, children_before: set[int]) -> None:
    """No action process outlives its action, no action directory or half-written blob stays."""
    deadline = time.monotonic() + 5
    while (extra := children_of(os.getpid()) - children_before) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not extra, f"processes left running: {sorted(extra)}"
    work_root = worker.config.execution.work_root
    assert action_leftovers(work_root) == []
    tmp = Path(worker.config.storage.path or os.path.join(work_root, "cas")) / "tmp"
    if tmp.exists():
        assert sorted(os.listdir(tmp)) == [], "half-written blobs left in the store's tmp directory"


def own_worker_id() -> str:
    """Workers sharing an id share cgroup directories; one of its own keeps other workers' ends away."""
    return f"hostile-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def hostile_worker(start_worker: Callable[..., Any]) -> Iterator[tuple[Any, grpc.Channel]]:
    """A host worker with small caps (so exceeding them is cheap), its channel, and the leak check."""
    before = children_of(os.getpid())
    worker = start_worker({**WORKER_CONFIG, "server": {"worker_id": own_worker_id()}})
    with grpc.insecure_channel(worker.target) as channel:
        yield worker, channel
        healthy(channel)
    nothing_left_behind(worker, before)


# ---- strategies ------------------------------------------------------------------------------------

NAME = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="/\x00"), min_size=1, max_size=12
).filter(lambda s: s not in (".", ".."))
"""One valid path component: any UTF-8 but '/' and NUL, never '.' or '..'."""
ENV_NAME = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)
ENV_VALUE = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)
EXECUTION_ID = st.from_regex(r"[A-Za-z0-9._:-]{1,128}", fullmatch=True)
HEX = "0123456789abcdef"

BAD_PATHS = st.one_of(
    st.sampled_from(["..", "../x", "a/../b", "a/..", "/", "/etc/passwd", "a//b", "a/", "./a", "a/./b", "."]),
    st.builds(lambda a, b: f"{a}\x00{b}", NAME, NAME),
    st.builds(lambda a: "/" + a, NAME),
    st.builds(lambda a, b: f"{a}/../{b}", NAME, NAME),
    st.integers(3073, 5000).map(lambda n: "x" * n),
    st.integers(257, 400).map(lambda n: "/".join(["d"] * n)),
    st.integers(128, 200).map(lambda n: "a/" + "é" * n),  # one component over 255 bytes
    st.integers(256, 300).map(lambda n: "y" * n),
)
"""Paths every path field must refuse (not the empty one: working_directory allows it)."""

BAD_EXECUTION_IDS = st.one_of(
    st.sampled_from(["a b", "a/b", "é", "x\x00", "x" * 129, "id?", "\n"]),
    st.text(min_size=1, max_size=140).filter(
        lambda s: not all(c.isascii() and (c.isalnum() or c in "._:-") for c in s) or len(s) > 128
    ),
)
BAD_IMAGES = st.sampled_from(
    ["Upper/Case", "a b", ":tag", "a:", "-a", "a@sha256:zz", "x" * 513, "a/b:" + "t" * 200, "\x00", "a//b"]
)
BAD_SHA256 = st.one_of(
    st.text(alphabet=HEX, max_size=63),
    st.text(alphabet=HEX, min_size=65, max_size=80),
    st.text(alphabet=HEX.upper(), min_size=64, max_size=64).filter(lambda s: s != s.lower()),
    st.text(alphabet="ghijklmnop", min_size=64, max_size=64),
    st.text(alphabet=HEX, min_size=63, max_size=63).map(lambda s: s + "\x00"),
)
GOOD_SHA256 = st.text(alphabet=HEX, min_size=64, max_size=64)

COMMANDS = [
    ["/bin/true"],
    ["/bin/sh", "-c", "mkdir -p out/sub && printf A > out/a && printf B > out/sub/b && echo done"],
    ["/bin/sh", "-c", "echo err >&2; exit 3"],
    ["/bin/sh", "-c", 'cat; echo "$X"'],
    ["/bin/sh", "-c", "ln -s ../escape out-link 2>/dev/null; mkdir -p o && : > o/empty"],
    ["sh", "-c", "ls -R . >/dev/null"],
    ["/nonexistent/tool", "x"],
    ["/bin/sh", "-c", "kill -9 $$"],
]


@st.composite
def valid_execute(draw: st.DrawFn, blobs: list[pb.Digest]) -> pb.ExecuteRequest:
    """A request every worker must accept: unique, normalised paths in separate subtrees."""
    req = pb.ExecuteRequest(argv=draw(st.sampled_from(COMMANDS)))
    req.environment.update({**draw(st.dictionaries(ENV_NAME, ENV_VALUE, max_size=4)), **ENV})
    if draw(st.booleans()):
        req.execution_id = draw(EXECUTION_ID)
    files: list[str] = []
    for i in range(draw(st.integers(0, 4))):
        path = f"in/{i}-" + "/".join(draw(st.lists(NAME, min_size=1, max_size=3)))
        files.append(path)
        if blobs and draw(st.booleans()):
            req.input_files.add(path=path, digest=draw(st.sampled_from(blobs)))
        else:
            req.input_files.add(
                path=path, content=draw(st.binary(max_size=64)), is_executable=draw(st.booleans())
            )
    for i in range(draw(st.integers(0, 3))):
        req.input_directories.add(path=f"dirs/{i}-" + "/".join(draw(st.lists(NAME, min_size=1, max_size=3))))
    for i in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from([*(f"../{f}" for f in files), "dangling", "../dirs", f"{i}-x"]))
        req.input_symlinks.add(path=f"links/{i}-{draw(NAME)}", target=target)
    outputs = ["out/a", "out/sub/b", "o", "o/empty", "out-link", "never"]
    req.output_files.extend(draw(st.lists(st.sampled_from(outputs), max_size=5)))  # duplicates allowed
    req.output_directories.extend(
        draw(st.lists(st.sampled_from(["out", "o", "out/sub", "none"]), max_size=3))
    )
    if draw(st.booleans()):
        req.working_directory = "wd/" + draw(NAME)
    req.stdin = draw(st.binary(max_size=128))
    req.timeout.FromSeconds(draw(st.sampled_from([0, 10, 30])))
    limit = draw(st.sampled_from(["none", "memory", "processes"]))
    if limit == "memory":
        req.limits.memory_bytes = draw(st.integers(64 << 20, 1 << 30))
    elif limit == "processes":
        req.limits.max_processes = draw(st.integers(8, 512))
    if draw(st.booleans()):
        req.executor.name = "host"
    if draw(st.booleans()):
        req.executor.min_isolation = pb.ISOLATION_LEVEL_HOST
    if draw(st.booleans()):
        req.container_image = draw(st.sampled_from(["busybox:stable", "registry.example:5000/team/tool:1.2"]))
    req.platform_properties.update(draw(st.dictionaries(NAME, NAME, max_size=3)))
    req.omit_output_contents = draw(st.booleans())
    return req


# Each fault takes a valid request, breaks exactly one thing, and says how the worker must answer.
Fault = Callable[[st.DrawFn, pb.ExecuteRequest, list[pb.Digest]], Expect]


def _path_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    bad = draw(BAD_PATHS)
    where = draw(st.sampled_from(["file", "dir", "link", "out_file", "out_dir", "workdir"]))
    if where == "file":
        i = len(req.input_files)
        req.input_files.add(path=bad, content=b"x")
        return refused("bad input file path", f"input_files[{i}].path")
    if where == "dir":
        i = len(req.input_directories)
        req.input_directories.add(path=bad)
        return refused("bad input directory", f"input_directories[{i}]")
    if where == "link":
        i = len(req.input_symlinks)
        req.input_symlinks.add(path=bad, target="x")
        return refused("bad symlink path", f"input_symlinks[{i}].path")
    if where == "out_file":
        i = draw(st.integers(0, len(req.output_files)))
        req.output_files.insert(i, bad)
        return refused("bad output file", f"output_files[{i}]")
    if where == "out_dir":
        i = draw(st.integers(0, len(req.output_directories)))
        req.output_directories.insert(i, bad)
        return refused("bad output directory", f"output_directories[{i}]")
    req.working_directory = bad
    return refused("bad working directory", "working_directory")


def _empty_path_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    i = len(req.output_files)
    req.output_files.append("")
    return refused("empty output path", f"output_files[{i}]")


def _symlink_target_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    i = len(req.input_symlinks)
    kind = draw(st.sampled_from(["escape", "absolute", "empty", "nul", "long", "through"]))
    if kind == "through":  # a target that walks through another input symlink could leave the root
        req.input_symlinks.add(path=f"links/{i}-hop", target="..")
        req.input_symlinks.add(path=f"links/{i + 1}-via", target=f"{i}-hop/../../etc")
        return refused("target through a symlink", f"input_symlinks[{i + 1}].target")
    target = {
        "escape": "../" * draw(st.integers(2, 6)) + "etc/passwd",
        "absolute": "/etc/passwd",
        "empty": "",
        "nul": "a\x00b",
        "long": "t/" * 2100,
    }[kind]
    req.input_symlinks.add(path=f"links/{i}-bad", target=target)
    return refused(f"symlink target {kind}", f"input_symlinks[{i}].target")


def _duplicate_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    kind = draw(st.sampled_from(["file-file", "dir-file", "link-file", "under-file", "workdir-file"]))
    i = len(req.input_files)
    req.input_files.add(path=f"dup/{i}", content=b"first")
    if kind == "file-file":
        req.input_files.add(path=f"dup/{i}", content=b"second")
        return refused("duplicate input file", f"input_files[{i + 1}].path")
    if kind == "dir-file":
        j = len(req.input_directories)
        req.input_directories.add(path=f"dup/{i}")
        return refused("directory over a file", f"input_directories[{j}]")
    if kind == "link-file":
        j = len(req.input_symlinks)
        req.input_symlinks.add(path=f"dup/{i}", target="x")
        return refused("symlink over a file", f"input_symlinks[{j}].path")
    if kind == "under-file":
        req.input_files.add(path=f"dup/{i}/child", content=b"")
        return refused("file under a file", f"input_files[{i + 1}].path")
    req.working_directory = f"dup/{i}"
    return refused("working directory is a file", "working_directory")


def _digest_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    i = len(req.input_files)
    field = f"input_files[{i}]"
    kind = draw(st.sampled_from(["sha", "size", "unknown", "wrong-size", "no-source"]))
    if kind == "sha":
        req.input_files.add(path="bad-digest", digest=pb.Digest(sha256=draw(BAD_SHA256), size_bytes=1))
        return refused("malformed sha256", f"{field}.digest")
    if kind == "size":
        sha = draw(GOOD_SHA256)
        req.input_files.add(
            path="bad-digest", digest=pb.Digest(sha256=sha, size_bytes=draw(st.integers(-(1 << 63), -1)))
        )
        return refused("negative size", f"{field}.digest")
    if kind == "no-source":
        req.input_files.add(path="no-source")
        return refused("no content and no digest", field)
    if kind == "unknown":
        sha = draw(GOOD_SHA256.filter(lambda s: s != EMPTY_SHA256))
        digest = pb.Digest(sha256=sha, size_bytes=draw(st.integers(1, 1 << 40)))
    else:
        known = draw(st.sampled_from(blobs))
        digest = pb.Digest(sha256=known.sha256, size_bytes=known.size_bytes + draw(st.integers(1, 1000)))
    req.input_files.add(path="missing-blob", digest=digest)
    return refused(f"{kind} blob", field, digest.sha256, code=SC.FAILED_PRECONDITION)


def _inline_cap_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    size = draw(st.integers(INLINE_CAP + 1, 4 * INLINE_CAP))
    for k in range(3):
        req.input_files.add(path=f"inline/{k}", content=b"z" * (size // 3 + 1))
    return refused("inline content over the cap", "input_files")


def _limit_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    name = draw(st.sampled_from(["cpu_cores", "memory_bytes", "max_processes", "disk_bytes"]))
    if name == "cpu_cores":
        value: float = draw(st.sampled_from([math.nan, math.inf, -math.inf, -1.0, -1e-300, 1e6, 1e300, -0.5]))
    elif name == "max_processes":
        value = draw(st.one_of(st.integers(-(1 << 63), -1), st.integers(4_194_305, (1 << 63) - 1)))
    else:
        value = draw(st.integers(-(1 << 63), -1))
    req.limits.Clear()
    setattr(req.limits, name, value)
    return refused(f"limit {name}={value}", f"limits.{name}")


def _unenforceable_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    """A plain process cannot get a CPU share or lose the network: refused, not silently ignored."""
    req.limits.Clear()
    if draw(st.booleans()):
        req.limits.cpu_cores = draw(st.floats(0.01, 64))
        return refused("cpu on host", "limits.cpu_cores", code=SC.FAILED_PRECONDITION)
    req.limits.network = pb.NETWORK_ACCESS_DISABLED
    return refused("no network on host", "limits.network", code=SC.FAILED_PRECONDITION)


def _enum_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    value = draw(st.one_of(st.integers(5, (1 << 31) - 1), st.integers(-(1 << 31), -1)))
    if draw(st.booleans()):
        req.limits.network = value  # an open enum: any int32 travels
        return refused("unknown network value", "limits.network")
    req.executor.min_isolation = value
    return refused("unknown isolation value", "executor.min_isolation")


def _selection_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    if draw(st.booleans()):
        req.executor.name = draw(NAME.filter(lambda s: s != "host"))
        return refused("unknown executor", "executor.name")
    req.executor.min_isolation = draw(
        st.sampled_from(
            [
                pb.ISOLATION_LEVEL_NAMESPACE_SANDBOX,
                pb.ISOLATION_LEVEL_CONTAINER,
                pb.ISOLATION_LEVEL_VIRTUALIZED,
            ]
        )
    )
    return refused("isolation above host", "isolation", code=SC.FAILED_PRECONDITION)


def _environment_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    kind = draw(st.sampled_from(["empty", "equals", "nul-name", "nul-value"]))
    if kind == "nul-value":
        req.environment["BAD"] = draw(ENV_VALUE) + "\x00"
    else:
        name = {"empty": "", "equals": draw(ENV_NAME) + "=x", "nul-name": "A\x00B"}[kind]
        req.environment[name] = "v"
    return refused(f"environment {kind}", "environment")


def _argv_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    kind = draw(st.sampled_from(["empty", "empty-program", "nul"]))
    del req.argv[:]
    if kind == "empty":
        return refused("no argv", "argv")
    if kind == "empty-program":
        req.argv.extend(["", "x"])
        return refused("empty argv[0]", "argv[0]")
    n = draw(st.integers(1, 5))
    req.argv.extend(["/bin/echo", *["ok"] * (n - 1), "a\x00b"])
    return refused("NUL in argv", f"argv[{n}]")


def _id_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    req.execution_id = draw(BAD_EXECUTION_IDS)
    return refused("bad execution id", "execution_id")


def _image_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    req.container_image = draw(BAD_IMAGES)
    return refused("bad image", "container_image")


def _timeout_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    kind = draw(st.sampled_from(["negative", "negative-nanos", "above-max", "huge"]))
    req.timeout.Clear()
    if kind == "negative":
        req.timeout.seconds = draw(st.integers(-(1 << 40), -1))
    elif kind == "negative-nanos":
        req.timeout.nanos = draw(st.integers(-999_999_999, -1))
    elif kind == "above-max":
        req.timeout.seconds = draw(st.integers(MAX_TIMEOUT + 1, 10 * MAX_TIMEOUT))
    else:
        req.timeout.seconds = draw(st.integers(1 << 40, (1 << 62)))
    return refused(f"timeout {kind}", "timeout")


def _too_many_entries_fault(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    """execution.max_input_entries bounds files + directories + symlinks, refused before staging."""
    n = draw(st.integers(INPUT_ENTRIES_CAP + 1, 4 * INPUT_ENTRIES_CAP))
    req.input_directories.extend(pb.InputDirectory(path=f"many/{k}") for k in range(n))
    return refused("too many input entries", "input", "max_input_entries")


def _huge_valid_counts(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    """Large but legal: many outputs, arguments and variables are a request like any other."""
    kind = draw(st.sampled_from(["outputs", "argv", "environment", "entries"]))
    n = draw(st.integers(1000, 20_000))
    if kind == "outputs":
        req.output_files.extend(f"many/{k}" for k in range(n))
        req.output_directories.extend(f"dirs-out/{k}" for k in range(n // 10))
    elif kind == "argv":
        del req.argv[:]
        req.argv.extend(["/bin/true", *(f"arg{k}" for k in range(n))])
    elif kind == "environment":
        req.environment.update({f"V{k}": "x" * 8 for k in range(n // 4)})
    else:
        room = INPUT_ENTRIES_CAP - len(req.input_files) - len(req.input_directories) - len(req.input_symlinks)
        req.input_directories.extend(pb.InputDirectory(path=f"entries/{k}") for k in range(room))
    return Expect(note=f"many {kind}")


def _stretched_limits(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    """Extreme but finite limits: either run (with some result) or be refused naming the limit."""
    req.limits.Clear()
    name = draw(st.sampled_from(["memory_bytes", "max_processes"]))
    value = (1 << 63) - 1 if name == "memory_bytes" else draw(st.sampled_from([1, 2, 4_194_304]))
    setattr(req.limits, name, value)
    return Expect(
        frozenset({SC.INVALID_ARGUMENT}), (f"limits.{name}",), may_accept=True, note=f"{name}={value}"
    )


def _tiny_timeout(draw: st.DrawFn, req: pb.ExecuteRequest, blobs: list[pb.Digest]) -> Expect:
    req.timeout.Clear()
    req.timeout.nanos = draw(st.integers(1, 1_000_000))
    return Expect(note="a timeout of at most a millisecond")


FAULTS: list[Fault] = [
    _path_fault,
    _path_fault,
    _empty_path_fault,
    _symlink_target_fault,
    _duplicate_fault,
    _digest_fault,
    _inline_cap_fault,
    _limit_fault,
    _unenforceable_fault,
    _enum_fault,
    _selection_fault,
    _environment_fault,
    _argv_fault,
    _id_fault,
    _image_fault,
    _timeout_fault,
    _too_many_entries_fault,
    _huge_valid_counts,
    _stretched_limits,
    _tiny_timeout,
]


@st.composite
def hostile_execute(draw: st.DrawFn, blobs: list[pb.Digest]) -> tuple[pb.ExecuteRequest, Expect]:
    req = draw(valid_execute(blobs))
    if draw(st.integers(0, 4)) == 0:
        return req, Expect()
    fault = draw(st.sampled_from(FAULTS))
    return req, fault(draw, req, blobs)


# ---- checking an Execute stream ------------------------------------------------------------------------


def check_execute(stub: pb_grpc.WorkerServiceStub, req: pb.ExecuteRequest, expect: Expect) -> None:
    """Read the whole stream; a refusal must come before 'accepted', an accepted action ends in one result."""
    events: list[pb.ExecuteResponse] = []
    call = stub.Execute(req, timeout=CALL_DEADLINE)
    try:
        for resp in call:
            events.append(resp)
    except grpc.RpcError as err:
        kinds = [e.WhichOneof("event") for e in events]
        assert not events, f"stream broke after {kinds} ({expect.note}): {err.code().name} {err.details()!r}"
        check_refusal("Execute", err, expect, expect.note)
        return
    assert not expect.codes or expect.may_accept, f"accepted what must be refused: {expect.note}"
    check_accepted_stream(req, events)


def check_accepted_stream(req: pb.ExecuteRequest, events: list[pb.ExecuteResponse]) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds and kinds[0] == "accepted", f"first event {kinds[:1]}"
    assert kinds.count("result") == 1 and kinds[-1] == "result", f"events {kinds}"
    accepted, result = events[0].accepted, events[-1].result
    assert result.execution_id == accepted.execution_id
    if req.execution_id:
        assert accepted.execution_id == req.execution_id
    assert result.status not in (pb.EXECUTION_STATUS_UNSPECIFIED, pb.EXECUTION_STATUS_INTERNAL), (
        f"{pb.ExecutionStatus.Name(result.status)}: {result.message!r}"
    )
    logs = {pb.LOG_STREAM_STDOUT: 0, pb.LOG_STREAM_STDERR: 0}
    sizes: dict[str, int] = {}
    hashes: dict[str, Any] = {}
    for e in events:
        if e.WhichOneof("event") == "log":
            assert e.log.stream in logs and e.log.offset == logs[e.log.stream], "log chunks not contiguous"
            logs[e.log.stream] += len(e.log.data)
        elif e.WhichOneof("event") == "output_chunk":
            c = e.output_chunk
            assert c.offset == sizes.get(c.path, 0), f"output {c.path!r}: chunks not contiguous"
            sizes[c.path] = c.offset + len(c.data)
            hashes.setdefault(c.path, hashlib.sha256()).update(c.data)
    assert result.stdout.streamed_bytes == logs[pb.LOG_STREAM_STDOUT]
    assert result.stderr.streamed_bytes == logs[pb.LOG_STREAM_STDERR]
    paths = [f.path for f in result.output_files]
    assert paths == sorted(set(paths)), f"output files not unique and in order: {paths}"
    manifest = {f.path: f.digest for f in result.output_files}
    if req.omit_output_contents:
        assert not sizes, "output contents streamed although omitted"
    else:
        assert set(sizes) <= set(manifest), f"chunks for unlisted outputs {set(sizes) - set(manifest)}"
        for path, digest in manifest.items():
            got = hashes.get(path, hashlib.sha256()).hexdigest()
            assert (got, sizes.get(path, 0)) == (digest.sha256, digest.size_bytes), f"output {path!r} differs"


def upload(stub: pb_grpc.WorkerServiceStub, data: bytes) -> pb.Digest:
    digest = pb.Digest(sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))
    stub.UploadBlobs(iter([pb.UploadBlobsRequest(digest=digest, offset=0, data=data)]), timeout=CALL_DEADLINE)
    return digest


# ---- the properties ------------------------------------------------------------------------------------


def test_random_and_adversarial_execute_requests(hostile_worker):
    """A scheduler's bug must never crash or wedge the worker: each request is answered in time, a
    refusal is a documented status naming the field, an accepted action ends in exactly one result."""
    _, channel = hostile_worker
    stub = pb_grpc.WorkerServiceStub(channel)
    blobs = [upload(stub, b"blob one\n"), upload(stub, os.urandom(3000))]

    @settings(max_examples=1200, **HYPOTHESIS)
    @given(case=hostile_execute(blobs))
    def property_(case: tuple[pb.ExecuteRequest, Expect]) -> None:
        req, expect = case
        check_execute(stub, req, expect)
        healthy(channel)

    property_()


@dataclass(frozen=True)
class BlobPlan:
    """One blob of an upload stream and how its pieces break the protocol ('ok': they do not)."""

    data: bytes
    fault: str
    split: int

    @property
    def true_digest(self) -> pb.Digest:
        return pb.Digest(sha256=hashlib.sha256(self.data).hexdigest(), size_bytes=len(self.data))


_NONCE = itertools.count()
UPLOAD_FAULTS = [
    "ok",
    "ok",
    "ok",
    "wrong-sha",
    "size-too-big",
    "size-too-small",
    "first-offset",
    "gap",
    "overlap",
    "malformed-sha",
    "negative-size",
    "switch-mid-blob",
    "larger-than-store",
]


@st.composite
def blob_plans(draw: st.DrawFn) -> list[BlobPlan]:
    plans = []
    for _ in range(draw(st.integers(0, 4))):
        body = draw(st.binary(max_size=4096)) + b"#" + str(next(_NONCE)).encode()  # new content every time
        plans.append(BlobPlan(body, draw(st.sampled_from(UPLOAD_FAULTS)), draw(st.integers(1, 4))))
    return plans


def pieces_of(plan: BlobPlan) -> tuple[list[pb.UploadBlobsRequest], Expect, pb.Digest]:
    """The requests for one blob, what the worker must answer, and the digest that must stay missing."""
    data, fault = plan.data, plan.fault
    digest = plan.true_digest
    step = max(1, len(data) // plan.split)
    offsets = list(range(0, len(data), step)) or [0]

    def piece(d: pb.Digest, offset: int, chunk: bytes) -> pb.UploadBlobsRequest:
        return pb.UploadBlobsRequest(digest=d, offset=offset, data=chunk)

    if fault == "wrong-sha":
        digest = pb.Digest(sha256=hashlib.sha256(data + b"!").hexdigest(), size_bytes=len(data))
    elif fault == "size-too-big":
        digest = pb.Digest(sha256=digest.sha256, size_bytes=len(data) + 1)
    elif fault == "size-too-small":
        digest = pb.Digest(sha256=digest.sha256, size_bytes=len(data) - 1)
    elif fault == "malformed-sha":
        digest = pb.Digest(sha256=digest.sha256.upper()[:63], size_bytes=len(data))
    elif fault == "negative-size":
        digest = pb.Digest(sha256=digest.sha256, size_bytes=-len(data))
    elif fault == "larger-than-store":
        digest = pb.Digest(sha256=digest.sha256, size_bytes=STORE_BYTES * 4)
    reqs = [piece(digest, o, data[o : o + step]) for o in offsets]
    if fault == "first-offset":
        reqs[0].offset = 1
    elif fault == "gap":
        reqs = [piece(digest, 0, data[:1]), piece(digest, 2, data[2:])]
    elif fault == "overlap":
        reqs = [piece(digest, 0, data[:2]), piece(digest, 1, data[1:])]
    elif fault == "switch-mid-blob":
        other = pb.Digest(sha256=hashlib.sha256(b"other").hexdigest(), size_bytes=5)
        reqs = [piece(digest, 0, data[:1]), piece(other, 0, b"other")]
    needles = (digest.sha256, plan.true_digest.sha256, "digest")
    if fault == "ok":
        return reqs, Expect(), digest
    if fault == "larger-than-store":
        codes = frozenset({SC.RESOURCE_EXHAUSTED, SC.INVALID_ARGUMENT})
        return reqs, Expect(codes, needles, note=fault), digest
    return reqs, refused(fault, *needles), digest


def test_random_and_adversarial_uploads(hostile_worker):
    """A broken upload stores nothing of the broken blob and says which blob; good blobs arrive intact."""
    _, channel = hostile_worker
    stub = pb_grpc.WorkerServiceStub(channel)

    @settings(max_examples=500, **HYPOTHESIS)
    @given(plans=blob_plans())
    def property_(plans: list[BlobPlan]) -> None:
        stream: list[pb.UploadBlobsRequest] = []
        expect, broken = Expect(), None
        good: list[BlobPlan] = []
        for plan in plans:
            reqs, expect, digest = pieces_of(plan)
            stream += reqs
            if expect.codes:
                broken = (plan, digest)
                break
            good.append(plan)
        try:
            resp = stub.UploadBlobs(iter(stream), timeout=CALL_DEADLINE)
        except grpc.RpcError as err:
            check_refusal("UploadBlobs", err, expect, [p.fault for p in plans])
        else:
            assert broken is None, f"upload with {broken[0].fault} succeeded"
            assert list(resp.stored) == [p.true_digest for p in good]
        if broken is not None and broken[0].fault not in ("malformed-sha", "negative-size"):
            missing = stub.FindMissingBlobs(
                pb.FindMissingBlobsRequest(digests=[broken[1]]), timeout=CALL_DEADLINE
            ).missing_digests
            assert list(missing) == [broken[1]], f"a blob broken by {broken[0].fault} became visible"
        for plan in good:  # whether or not a later blob broke the stream, a stored blob is intact
            data = b"".join(
                p.data
                for p in stub.ReadBlob(pb.ReadBlobRequest(digest=plan.true_digest), timeout=CALL_DEADLINE)
            )
            assert data == plan.data
        healthy(channel)

    property_()


def malformed_digest() -> st.SearchStrategy[pb.Digest]:
    return st.one_of(
        st.builds(lambda s: pb.Digest(sha256=s, size_bytes=1), BAD_SHA256),
        st.builds(lambda s, n: pb.Digest(sha256=s, size_bytes=n), GOOD_SHA256, st.integers(-(1 << 63), -1)),
    )


def any_digest(known: list[pb.Digest]) -> st.SearchStrategy[pb.Digest]:
    return st.one_of(
        st.sampled_from(known),
        st.builds(lambda s, n: pb.Digest(sha256=s, size_bytes=n), GOOD_SHA256, st.integers(0, 1 << 40)),
        malformed_digest(),
    )


def test_random_lookups_reads_cancels_and_warmups(hostile_worker):
    """Malformed digests and ids are INVALID_ARGUMENT naming the field, unknown ones NOT_FOUND, known
    ones answered right; none of it disturbs the worker."""
    worker, channel = hostile_worker
    stub = pb_grpc.WorkerServiceStub(channel)
    contents = [b"known-1", os.urandom(5000), b""]
    known = [upload(stub, c) for c in contents]
    by_sha = {d.sha256: c for d, c in zip(known, contents, strict=True)}

    def is_malformed(d: pb.Digest) -> bool:
        return len(d.sha256) != 64 or any(c not in HEX for c in d.sha256) or d.size_bytes < 0

    def is_known(d: pb.Digest) -> bool:
        return d.sha256 in by_sha and len(by_sha[d.sha256]) == d.size_bytes

    ops = st.one_of(
        st.tuples(st.just("find"), st.lists(any_digest(known), max_size=80)),
        st.tuples(st.just("read"), any_digest(known)),
        st.tuples(st.just("cancel"), st.one_of(EXECUTION_ID, BAD_EXECUTION_IDS, st.just(""))),
        st.tuples(
            st.just("warmup"),
            st.tuples(
                st.lists(st.one_of(st.just("host"), NAME), max_size=3), st.lists(BAD_IMAGES, max_size=2)
            ),
        ),
    )

    @settings(max_examples=800, **HYPOTHESIS)
    @given(op=ops)
    def property_(op: tuple[str, Any]) -> None:
        kind, arg = op
        if kind == "find":
            bad = [i for i, d in enumerate(arg) if is_malformed(d)]
            too_many = len(arg) > worker.config.execution.max_digests_per_request
            try:
                resp = stub.FindMissingBlobs(pb.FindMissingBlobsRequest(digests=arg), timeout=CALL_DEADLINE)
            except grpc.RpcError as err:
                needles = (f"digests[{bad[0]}]",) if bad else ("digests", "max_digests_per_request")
                check_refusal("FindMissingBlobs", err, refused("lookup", *needles), arg)
                return
            assert not bad, f"malformed digest digests[{bad[0]}] accepted"
            assert not too_many, f"{len(arg)} digests accepted over max_digests_per_request"
            assert list(resp.missing_digests) == [d for d in arg if not is_known(d)]
        elif kind == "read":
            try:
                data = b"".join(
                    p.data for p in stub.ReadBlob(pb.ReadBlobRequest(digest=arg), timeout=CALL_DEADLINE)
                )
            except grpc.RpcError as err:
                expect = (
                    refused("read", "digest")
                    if is_malformed(arg)
                    else refused("read unknown", arg.sha256, code=SC.NOT_FOUND)
                )
                check_refusal("ReadBlob", err, expect, arg)
                return
            assert is_known(arg), f"ReadBlob answered for a blob never stored: {arg}"
            assert data == by_sha[arg.sha256]
        elif kind == "cancel":
            try:
                stub.CancelExecution(pb.CancelExecutionRequest(execution_id=arg), timeout=CALL_DEADLINE)
            except grpc.RpcError as err:
                valid = (
                    bool(arg)
                    and len(arg) <= 128
                    and all(c.isascii() and (c.isalnum() or c in "._:-") for c in arg)
                )
                expect = (
                    refused("cancel unknown", arg, code=SC.NOT_FOUND)
                    if valid
                    else refused("bad id", "execution_id")
                )
                check_refusal("CancelExecution", err, expect, arg)
                return
            raise AssertionError(f"CancelExecution of an id nothing runs under succeeded: {arg!r}")
        else:
            names, images = arg
            try:
                stub.Warmup(pb.WarmupRequest(executors=names, images=images), timeout=CALL_DEADLINE)
            except grpc.RpcError as err:
                unknown = [i for i, n in enumerate(names) if n != "host"]
                needles = (f"executors[{unknown[0]}]",) if unknown else (f"images[{0}]",)
                check_refusal("Warmup", err, refused("warmup", *needles), arg)
                return
            assert all(n == "host" for n in names) and not images, f"Warmup accepted {arg!r}"
        healthy(channel)

    property_()


def test_conflicts_queue_overflow_and_oversized_requests(start_worker):
    """ALREADY_EXISTS names the id, a full queue is RESOURCE_EXHAUSTED, a message over max_request_bytes
    is refused by gRPC, and the queued and running actions still end once."""
    before = children_of(os.getpid())
    worker = start_worker(
        {
            "server": {"max_request_bytes": 1 << 20},
            "execution": {"max_concurrent_executions": 1, "max_queued_executions": 1},
        }
    )
    with grpc.insecure_channel(worker.target) as channel:
        stub = pb_grpc.WorkerServiceStub(channel)
        long = pb.ExecuteRequest(argv=["/bin/sleep", "60"], environment=ENV)
        running = stub.Execute(
            pb.ExecuteRequest(execution_id="running-1", argv=long.argv, environment=ENV),
            timeout=CALL_DEADLINE,
        )
        assert next(running).WhichOneof("event") == "accepted"
        queued = stub.Execute(
            pb.ExecuteRequest(execution_id="queued-1", argv=long.argv, environment=ENV), timeout=CALL_DEADLINE
        )
        assert next(queued).accepted.queue_position == 1

        for req, expect in [
            (
                pb.ExecuteRequest(execution_id="running-1", argv=["/bin/true"]),
                refused("same id", "running-1", code=SC.ALREADY_EXISTS),
            ),
            (
                pb.ExecuteRequest(execution_id="queued-1", argv=["/bin/true"]),
                refused("same id", "queued-1", code=SC.ALREADY_EXISTS),
            ),
            (
                pb.ExecuteRequest(argv=["/bin/true"]),
                refused("queue full", "queue", code=SC.RESOURCE_EXHAUSTED),
            ),
        ]:
            check_execute(stub, req, expect)
        big = pb.ExecuteRequest(argv=["/bin/true"], stdin=b"x" * (2 << 20))
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Execute(big, timeout=CALL_DEADLINE))
        assert info.value.code() is SC.RESOURCE_EXHAUSTED

        for execution_id, stream in (("queued-1", queued), ("running-1", running)):
            stub.CancelExecution(pb.CancelExecutionRequest(execution_id=execution_id), timeout=CALL_DEADLINE)
            rest = [e.WhichOneof("event") for e in stream]
            assert rest.count("result") == 1 and rest[-1] == "result"
        healthy(channel)
    nothing_left_behind(worker, before)


def test_undecodable_request_bytes_are_refused(start_worker):
    """Bytes that are no ExecuteRequest are a client's bug: refused as such, and the worker carries on."""
    worker = start_worker({"server": {"worker_id": own_worker_id()}})
    with grpc.insecure_channel(worker.target) as channel:
        raw = channel.unary_stream("/expbuild.worker.v1.WorkerService/Execute")
        for garbage in (b"\xff\xff\xff\xff", b"\x12\x03\xff\xfe\xfd", b"\x0a\x80"):
            with pytest.raises(grpc.RpcError) as info:
                list(raw(garbage, timeout=CALL_DEADLINE))
            assert info.value.code() in DOCUMENTED["Execute"], (
                f"undecodable request {garbage!r}: {info.value.code().name} {info.value.details()!r}"
            )
            healthy(channel)
