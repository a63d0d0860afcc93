"""The host executor, driven directly on an event loop: bytes, statuses and what is left behind."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncGenerator, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _support import children, is_worker_helper, placed_children, wait_gone, wait_until

from expbuild_worker.config import CgroupMode
from expbuild_worker.errors import ConfigError, PreconditionError, UnavailableError
from expbuild_worker.execution.cgroups import RESIDUE_BYTES, ActionCgroups, parse_mountinfo, read_mountinfo
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.host import HostExecutor
from expbuild_worker.execution.process import SPARE_CGROUPS, SPARE_CGROUPS_LOW
from expbuild_worker.execution.process import _helper_starter as helper_starter_module
from expbuild_worker.execution.process import _runner as process_runner
from expbuild_worker.execution.process import new_token as _new_token
from expbuild_worker.execution.process import owner_alive as _owner_alive
from expbuild_worker.execution.process._run import CHUNK_MAX
from expbuild_worker.execution.process._spawn import Starter
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorEvent,
    LogChunk,
    LogStream,
    ResourceLimit,
    ResourceLimits,
    RunOutcome,
    Started,
)

T = TypeVar("T")
ENV = {"PATH": "/usr/bin:/bin"}
GRACE = 0.2
IS_ROOT = os.geteuid() == 0
WORKER = "unit-tests"
"""The worker id of every executor here: a start only sweeps cgroups whose owning process is gone,
so test processes running side by side never touch each other's."""


def _cgroups_unavailable() -> str:
    """Why this process cannot create cgroups ('' when it can: root here, as in CI)."""
    try:
        cgroups = ActionCgroups.for_host(
            mountinfo=read_mountinfo(), parent="expbuild", worker_id=WORKER, executor="probe"
        )
    except PreconditionError as err:
        return str(err)
    cgroups.remove_base()
    return ""


CGROUPS_UNAVAILABLE = _cgroups_unavailable()
needs_cgroups = pytest.mark.skipif(
    bool(CGROUPS_UNAVAILABLE), reason=f"this process cannot create cgroups: {CGROUPS_UNAVAILABLE}"
)


_MADE: list[HostExecutor] = []


@pytest.fixture(autouse=True)
def _close_executors() -> Iterator[None]:
    """Close every executor a test made, so none leaves its spare cgroups behind."""
    yield
    while _MADE:
        asyncio.run(_MADE.pop().close())


def make_executor(
    *,
    refuse: bool = True,
    default_limits: ResourceLimits | None = None,
    max_limits: ResourceLimits | None = None,
    cgroups: CgroupMode = "auto",
    mountinfo: str | None = None,
    name: str = "host",
    run_as: tuple[int, int] | None = None,
    run_as_uids: range | None = None,
    reuse_cgroups: bool = True,
) -> HostExecutor:
    executor = HostExecutor(
        name=name,
        kill_grace_seconds=GRACE,
        refuse_unenforceable_limits=refuse,
        default_limits=default_limits or ResourceLimits(),
        max_limits=max_limits or ResourceLimits(),
        cgroups=cgroups,
        worker_id=WORKER,
        mountinfo=mountinfo,
        run_as=run_as,
        run_as_uids=run_as_uids,
        reuse_cgroups=reuse_cgroups,
    )
    _MADE.append(executor)
    return executor


def command(
    root: Path,
    *argv: str,
    stdin: bytes = b"",
    env: dict[str, str] | None = None,
    limits: ResourceLimits | None = None,
    working_directory: str = "",
) -> Command:
    return Command(
        execution_id="test-action",
        argv=argv,
        environment=ENV if env is None else env,
        root=root,
        working_directory=working_directory,
        stdin=stdin,
        limits=limits or ResourceLimits(),
    )


def sh(root: Path, script: str, **kwargs: Any) -> Command:
    return command(root, "/bin/sh", "-c", script, **kwargs)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test coroutine; the generous timeout turns a hang into a failure."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


@dataclass
class Result:
    events: list[ExecutorEvent] = field(default_factory=list)

    @property
    def outcome(self) -> RunOutcome:
        last = self.events[-1]
        assert isinstance(last, RunOutcome)
        return last

    def chunks(self, stream: LogStream) -> list[LogChunk]:
        return [e for e in self.events if isinstance(e, LogChunk) and e.stream is stream]

    @property
    def stdout(self) -> bytes:
        return b"".join(c.data for c in self.chunks(LogStream.STDOUT))

    @property
    def stderr(self) -> bytes:
        return b"".join(c.data for c in self.chunks(LogStream.STDERR))


def check_shape(events: list[ExecutorEvent]) -> None:
    """Started first (unless it never started), one RunOutcome last, contiguous bounded chunks."""
    assert isinstance(events[-1], RunOutcome)
    assert sum(isinstance(e, RunOutcome) for e in events) == 1
    if events[-1].started_at is None:
        assert not any(isinstance(e, Started) for e in events)
    else:
        assert isinstance(events[0], Started)
        assert events[0].at == events[-1].started_at
    offsets = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
    for event in events:
        if isinstance(event, LogChunk):
            assert event.offset == offsets[event.stream]
            assert 0 < len(event.data) <= CHUNK_MAX
            offsets[event.stream] += len(event.data)


async def collect(
    events: AsyncGenerator[ExecutorEvent, None], seen: list[ExecutorEvent] | None = None
) -> Result:
    """Consume the rest of ``events`` after ``seen`` (those already taken) and check the whole stream."""
    result = Result(list(seen or []))
    async for event in events:
        result.events.append(event)
    check_shape(result.events)
    return result


async def execute(
    cmd: Command, *, executor: HostExecutor | None = None, stop: StopSignal | None = None
) -> Result:
    return await collect((executor or make_executor()).execute(cmd, stop or StopSignal()))


async def until_stdout(
    events: AsyncGenerator[ExecutorEvent, None], marker: bytes, seen: list[ExecutorEvent]
) -> None:
    """Consume events until ``marker`` has appeared on stdout."""
    out = b""
    async for event in events:
        seen.append(event)
        if isinstance(event, LogChunk) and event.stream is LogStream.STDOUT:
            out += event.data
            if marker in out:
                return
    raise AssertionError(f"{marker!r} never appeared on stdout")


async def until_exists(path: Path) -> None:
    for _ in range(1000):
        if path.exists() and path.read_text().strip():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{path.name} never appeared")


def reaped(pid: int) -> bool:
    """True when ``pid`` was fully reaped: no process, not even a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def registered_callbacks() -> int:
    """How many descriptors the running loop watches (readers and writers)."""
    return len(asyncio.get_running_loop()._selector.get_map())  # type: ignore[attr-defined]


# ---- output ----------------------------------------------------------------------------------


def test_stdout_and_stderr_are_separate_and_byte_exact(tmp_path: Path) -> None:
    """Every byte value reaches the right stream unchanged, with no newline added at the end."""
    out = bytes(range(256)) * 3 + b"\r\n\x00end-of-stdout"
    err = bytes(reversed(range(256))) + b"end-of-stderr"
    (tmp_path / "out.bin").write_bytes(out)
    (tmp_path / "err.bin").write_bytes(err)
    result = run(execute(sh(tmp_path, "cat out.bin; cat err.bin >&2")))
    assert result.stdout == out
    assert result.stderr == err
    assert result.outcome.status is ExecutionStatus.COMPLETED
    assert result.outcome.exit_code == 0


def test_output_arrives_while_the_command_still_runs(tmp_path: Path) -> None:
    """The first line is streamed before the command ends: it only goes on once it is seen."""
    script = (
        "echo first; i=0; "
        "while [ ! -e go ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done; "
        "if [ -e go ]; then echo second; else echo never-saw-go; fi"
    )

    async def scenario() -> Result:
        result = Result()
        async for event in make_executor().execute(sh(tmp_path, script), StopSignal()):
            result.events.append(event)
            if isinstance(event, LogChunk) and event.data.startswith(b"first"):
                (tmp_path / "go").touch()
        check_shape(result.events)
        return result

    result = run(scenario())
    assert result.stdout == b"first\nsecond\n"


def test_large_output_arrives_intact_in_bounded_contiguous_chunks(tmp_path: Path) -> None:
    """5 MB of random bytes come through exactly, in order, at most 64 KiB per chunk."""
    data = os.urandom(5_000_000)
    (tmp_path / "big.bin").write_bytes(data)
    result = run(execute(command(tmp_path, "cat", "big.bin")))
    assert result.stdout == data
    assert len(result.chunks(LogStream.STDOUT)) < 200


def test_many_tiny_writes_are_batched_into_few_chunks(tmp_path: Path) -> None:
    """Writes already buffered when the consumer asks are sent together, not one message each."""
    script = "i=0; while [ $i -lt 2000 ]; do echo x; i=$((i+1)); done; echo 1 > done; sleep 600"

    async def scenario() -> Result:
        stop = StopSignal()
        events = make_executor().execute(sh(tmp_path, script), stop)
        first = await anext(events)
        await until_exists(tmp_path / "done")
        stop.request(ExecutionStatus.CANCELLED)
        return await collect(events, [first])

    result = run(scenario())
    assert result.stdout == b"x\n" * 2000
    assert len(result.chunks(LogStream.STDOUT)) <= 3


def test_slow_consumer_blocks_the_command_instead_of_buffering(tmp_path: Path) -> None:
    """While nobody takes events, the command waits on a full pipe; memory stays bounded."""
    size = 8 << 20

    async def scenario() -> tuple[bool, Result]:
        events = make_executor().execute(
            sh(tmp_path, f"head -c {size} /dev/zero; echo 1 > written"), StopSignal()
        )
        seen = [await anext(events), await anext(events)]
        await asyncio.sleep(0.5)
        finished_while_idle = (tmp_path / "written").exists()
        return finished_while_idle, await collect(events, seen)

    finished_while_idle, result = run(scenario())
    assert not finished_while_idle
    assert result.stdout == b"\0" * size
    assert (tmp_path / "written").exists()


def test_concurrent_commands_keep_their_output_apart(tmp_path: Path) -> None:
    """Many commands on one loop each get exactly their own bytes and exit code."""
    executor = make_executor()

    async def scenario() -> list[Result]:
        script = "i=0; while [ $i -lt 200 ]; do echo line-$0-$i; i=$((i+1)); done; echo err-$0 >&2; exit $0"
        return await asyncio.gather(
            *(
                execute(command(tmp_path, "/bin/sh", "-c", script, str(n)), executor=executor)
                for n in range(20)
            )
        )

    for n, result in enumerate(run(scenario())):
        assert result.stdout == b"".join(f"line-{n}-{i}\n".encode() for i in range(200))
        assert result.stderr == f"err-{n}\n".encode()
        assert result.outcome.exit_code == n


# ---- exit statuses ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 1, 255], ids=["zero", "one", "max"])
def test_exit_code_is_reported_as_a_completed_result(tmp_path: Path, code: int) -> None:
    """A non-zero exit is a result, not an error: COMPLETED with the exact code."""
    outcome = run(execute(sh(tmp_path, f"exit {code}"))).outcome
    assert outcome.status is ExecutionStatus.COMPLETED
    assert outcome.exit_code == code
    assert outcome.signal is None
    assert outcome.started_at is not None and outcome.ended_at is not None
    assert outcome.started_at <= outcome.ended_at


def test_death_by_signal_reports_the_signal_and_no_exit_code(tmp_path: Path) -> None:
    """A command killed by a signal it did not get from us ended by itself: COMPLETED, signal 9."""
    outcome = run(execute(sh(tmp_path, "kill -9 $$"))).outcome
    assert outcome.status is ExecutionStatus.COMPLETED
    assert outcome.signal == 9
    assert outcome.exit_code is None
    assert "SIGKILL" in outcome.message


# ---- starting --------------------------------------------------------------------------------


def test_missing_program_fails_to_start_naming_it(tmp_path: Path) -> None:
    """A missing argv[0] is FAILED_TO_START with a message naming it, not an exception."""
    result = run(execute(command(tmp_path, "/no/such/program", "arg")))
    assert [type(e) for e in result.events] == [RunOutcome]
    assert result.outcome.status is ExecutionStatus.FAILED_TO_START
    assert "/no/such/program" in result.outcome.message


@pytest.mark.parametrize(
    ("argv0", "env", "expected"),
    [
        ("no-such-tool", ENV, "not found"),
        ("sh", {}, "no PATH"),
        ("./not-executable", ENV, "ermission denied"),
        ("not-executable", {"PATH": "."}, "ermission denied"),
    ],
    ids=["not-on-path", "bare-name-without-path", "not-executable-path", "not-executable-on-path"],
)
def test_unrunnable_program_fails_to_start(
    tmp_path: Path, argv0: str, env: dict[str, str], expected: str
) -> None:
    """Lookup follows the command's own PATH; what cannot run is reported with the reason."""
    (tmp_path / "not-executable").write_text("#!/bin/sh\necho hi\n")
    outcome = run(execute(command(tmp_path, argv0, env=env))).outcome
    assert outcome.status is ExecutionStatus.FAILED_TO_START
    assert argv0 in outcome.message
    assert expected in outcome.message


def test_missing_working_directory_fails_to_start(tmp_path: Path) -> None:
    """A working directory that does not exist is named in the FAILED_TO_START message."""
    outcome = run(execute(command(tmp_path, "/bin/true", working_directory="sub/dir"))).outcome
    assert outcome.status is ExecutionStatus.FAILED_TO_START
    assert "sub/dir" in outcome.message


def test_program_is_found_on_the_command_path_and_runs_in_its_directory(tmp_path: Path) -> None:
    """A bare name resolves against the command's PATH (not the worker's); cwd is root/working_directory."""
    tools = tmp_path / "tools"
    tools.mkdir()
    tool = tools / "where-am-i"
    tool.write_text("#!/bin/sh\npwd\n")
    tool.chmod(0o755)
    (tmp_path / "work" / "sub").mkdir(parents=True)
    env = {"PATH": f"{tools}:/bin"}
    result = run(execute(command(tmp_path, "where-am-i", env=env, working_directory="work/sub")))
    assert result.outcome.exit_code == 0
    assert result.stdout == f"{tmp_path / 'work' / 'sub'}\n".encode()


def test_relative_program_path_is_relative_to_the_working_directory(tmp_path: Path) -> None:
    """``./tool`` means the tool in the command's working directory."""
    (tmp_path / "wd").mkdir()
    tool = tmp_path / "wd" / "tool"
    tool.write_text("#!/bin/sh\necho from-wd\n")
    tool.chmod(0o755)
    result = run(execute(command(tmp_path, "./tool", env={}, working_directory="wd")))
    assert result.stdout == b"from-wd\n"


def test_environment_is_exactly_the_given_one(tmp_path: Path) -> None:
    """Nothing of the worker's environment leaks into the command."""
    env = {"ONE": "1", "SPACED": "two words", "EMPTY": ""}
    result = run(execute(command(tmp_path, "/usr/bin/env", env=env)))
    assert sorted(result.stdout.decode().splitlines()) == sorted(f"{k}={v}" for k, v in env.items())


def test_stdin_bytes_reach_the_command(tmp_path: Path) -> None:
    """Stdin larger than a pipe buffer arrives whole and unchanged."""
    data = os.urandom(1 << 20)
    result = run(execute(command(tmp_path, "cat", stdin=data)))
    assert result.stdout == data


def test_stdin_the_command_ignores_does_not_hang(tmp_path: Path) -> None:
    """A command that exits without reading its stdin ends normally (the broken pipe is ours to absorb)."""
    outcome = run(execute(sh(tmp_path, "exit 3", stdin=os.urandom(4 << 20)))).outcome
    assert outcome.status is ExecutionStatus.COMPLETED
    assert outcome.exit_code == 3


def test_empty_stdin_is_end_of_file(tmp_path: Path) -> None:
    """Without stdin bytes, a reading command sees end-of-file at once instead of waiting forever."""
    result = run(execute(command(tmp_path, "cat")))
    assert result.outcome.exit_code == 0
    assert result.stdout == b""


# ---- stopping and cleaning up ----------------------------------------------------------------

SPAWNS_GRANDCHILD = "echo $$ > leader; sleep 600 & echo $! > grandchild; echo ready; sleep 600"


def test_stop_kills_the_command_and_its_grandchildren(tmp_path: Path) -> None:
    """A timeout ends as TIMED_OUT within seconds, and no process of the action survives."""

    async def scenario() -> Result:
        stop = StopSignal()
        seen: list[ExecutorEvent] = []
        events = make_executor().execute(sh(tmp_path, SPAWNS_GRANDCHILD), stop)
        await until_stdout(events, b"ready", seen)
        stop.request(ExecutionStatus.TIMED_OUT)
        return await collect(events, seen)

    began = time.monotonic()
    result = run(scenario())
    assert time.monotonic() - began < 5
    assert result.outcome.status is ExecutionStatus.TIMED_OUT
    assert reaped(int((tmp_path / "leader").read_text()))
    assert wait_gone(int((tmp_path / "grandchild").read_text()))


def test_stop_escalates_to_sigkill_when_sigterm_is_ignored(tmp_path: Path) -> None:
    """A command deaf to SIGTERM is SIGKILLed after the grace period and ends with the stop reason."""

    async def scenario() -> Result:
        stop = StopSignal()
        seen: list[ExecutorEvent] = []
        events = make_executor().execute(sh(tmp_path, "trap '' TERM; echo ready; sleep 600"), stop)
        await until_stdout(events, b"ready", seen)
        stop.request(ExecutionStatus.CANCELLED)
        stop.request(ExecutionStatus.TIMED_OUT)
        return await collect(events, seen)

    outcome = run(scenario()).outcome
    assert outcome.status is ExecutionStatus.CANCELLED
    assert outcome.signal == 9
    assert "SIGKILL" in outcome.message


def test_stop_requested_before_start_runs_nothing(tmp_path: Path) -> None:
    """A command stopped before it started is not started at all."""
    stop = StopSignal()
    stop.request(ExecutionStatus.CANCELLED)
    result = run(execute(sh(tmp_path, "touch ran"), stop=stop))
    assert result.outcome.status is ExecutionStatus.CANCELLED
    assert not (tmp_path / "ran").exists()


@pytest.mark.parametrize(
    "redirect", ["", " >/dev/null 2>&1"], ids=["holding-the-pipes", "detached-from-pipes"]
)
def test_background_grandchild_dies_with_the_command(tmp_path: Path, redirect: str) -> None:
    """What the command leaves running in its process group is killed when the command exits."""
    script = f"sleep 600{redirect} & echo $! > grandchild; echo done"
    result = run(execute(sh(tmp_path, script)))
    assert result.outcome.status is ExecutionStatus.COMPLETED
    assert result.outcome.exit_code == 0
    assert result.stdout == b"done\n"
    assert wait_gone(int((tmp_path / "grandchild").read_text()))


def assert_nothing_left(
    tmp_path: Path, fds_before: int, fds_after: int, cbs_before: int, cbs_after: int
) -> None:
    """The leader is reaped, the grandchild gone, and no descriptor or loop callback is left."""
    assert reaped(int((tmp_path / "leader").read_text()))
    assert wait_gone(int((tmp_path / "grandchild").read_text()))
    assert fds_after == fds_before
    assert cbs_after == cbs_before


def action_fds(executor: HostExecutor) -> int:
    """This process's open descriptors less the executor's standing ones: a socket for each
    child placed ahead of need (how many wait depends on where the spares are between their
    low and high water marks)."""
    starter = executor._runner.starter
    return open_fds() - (len(_placed_children(starter)) if starter.reaps_here else 0)


async def spares_placed(executor: HostExecutor) -> None:
    """Wait (2 s at most) until the executor's spare cgroups are made and have their helpers
    placed, and the last action's cgroup is back among them or removed (either needs its
    processes gone, and so their reaps under way): the descriptors it keeps standing (their
    sockets) are all open then, and no action's are."""
    await asyncio.sleep(0)  # spares are topped up soon after an action, not at once
    for _ in range(200):
        if not getattr(executor._runner.starter, "_pending", None) and not executor._runner._leftovers:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)  # the reaps of processes seen gone run on the loop


def test_closing_the_stream_mid_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """aclose() kills and reaps everything, and releases every descriptor and loop callback."""

    async def scenario() -> tuple[int, int, int, int]:
        executor = make_executor()
        await executor.start()
        await spares_placed(executor)
        fds, callbacks = action_fds(executor), registered_callbacks()
        events = executor.execute(sh(tmp_path, SPAWNS_GRANDCHILD), StopSignal())
        await until_stdout(events, b"ready", [])
        await events.aclose()
        await spares_placed(executor)
        return fds, action_fds(executor), callbacks, registered_callbacks()

    assert_nothing_left(tmp_path, *run(scenario()))


def test_cancelling_the_consumer_leaves_nothing_behind(tmp_path: Path) -> None:
    """Cancelling the task that reads the stream kills and reaps the command and frees its descriptors."""

    async def scenario() -> tuple[int, int, int, int]:
        executor = make_executor()
        await executor.start()
        await spares_placed(executor)
        fds, callbacks = action_fds(executor), registered_callbacks()
        task = asyncio.ensure_future(execute(sh(tmp_path, SPAWNS_GRANDCHILD), executor=executor))
        await until_exists(tmp_path / "grandchild")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await spares_placed(executor)
        return fds, action_fds(executor), callbacks, registered_callbacks()

    assert_nothing_left(tmp_path, *run(scenario()))


def test_close_kills_running_commands_and_refuses_new_ones(tmp_path: Path) -> None:
    """Closing the executor stops what it runs (reported CANCELLED) and it accepts nothing after."""

    async def scenario() -> Result:
        executor = make_executor()
        task = asyncio.ensure_future(execute(sh(tmp_path, SPAWNS_GRANDCHILD), executor=executor))
        await until_exists(tmp_path / "grandchild")
        await executor.close()
        assert reaped(int((tmp_path / "leader").read_text()))
        result = await task
        await executor.close()
        with pytest.raises(UnavailableError):
            await anext(executor.execute(sh(tmp_path, "true"), StopSignal()))
        return result

    result = run(scenario())
    assert result.outcome.status is ExecutionStatus.CANCELLED
    assert wait_gone(int((tmp_path / "grandchild").read_text()))


# ---- limits and usage without cgroups (rlimits) ----------------------------------------------

PYTHON = sys.executable
NO_CGROUP_MOUNTS = "26 25 0:23 / /proc/1 rw - cgroup cgroup rw,memory,cpuacct\n"
"""A memory and cpuacct hierarchy where nobody can create a cgroup."""


def test_without_cgroups_a_memory_limit_makes_a_big_allocation_fail(tmp_path: Path) -> None:
    """RLIMIT_AS turns an allocation past the limit into a failure the command sees (a normal exit)."""
    code = "print('started', flush=True); b = bytearray(1 << 30)"
    limits = ResourceLimits(memory_bytes=512 << 20)
    executor = make_executor(cgroups="off")
    result = run(execute(command(tmp_path, PYTHON, "-c", code, env={}, limits=limits), executor=executor))
    assert result.stdout == b"started\n"
    assert result.outcome.status is ExecutionStatus.COMPLETED
    assert result.outcome.exit_code == 1
    assert b"MemoryError" in result.stderr


@pytest.mark.parametrize("mode", ["off", "auto-unavailable"])
def test_without_cgroups_unset_memory_limit_takes_the_default_then_the_maximum(
    tmp_path: Path, mode: str
) -> None:
    """Cgroups off or impossible: a default, else the maximum, caps the address space as an rlimit."""
    script = "ulimit -v"
    mountinfo = NO_CGROUP_MOUNTS if mode == "auto-unavailable" else None
    cgroups: CgroupMode = "off" if mode == "off" else "auto"
    with_default = make_executor(
        default_limits=ResourceLimits(memory_bytes=300 << 20), cgroups=cgroups, mountinfo=mountinfo
    )
    with_max = make_executor(
        max_limits=ResourceLimits(memory_bytes=400 << 20), cgroups=cgroups, mountinfo=mountinfo
    )
    assert run(execute(sh(tmp_path, script), executor=with_default)).stdout == b"307200\n"
    assert run(execute(sh(tmp_path, script), executor=with_max)).stdout == b"409600\n"


def test_without_cgroups_a_small_command_is_not_charged_the_worker_memory(tmp_path: Path) -> None:
    """Without a cgroup a tiny command's peak is unknown rather than the worker's own RSS (exec's report)."""
    worker_peak = (300 << 20) * 2
    ballast = b"x" * worker_peak  # make the worker's peak clearly larger than the command's
    outcome = run(execute(command(tmp_path, "/bin/true"), executor=make_executor(cgroups="off"))).outcome
    del ballast
    peak = outcome.usage.peak_memory_bytes
    assert peak is None or peak < worker_peak


@pytest.mark.parametrize("cgroups", ["off", pytest.param("auto", marks=needs_cgroups)])
def test_usage_reports_cpu_time_and_peak_memory(tmp_path: Path, cgroups: CgroupMode) -> None:
    """User CPU of a busy loop and the peak of a 300 MB allocation are reported, plausibly; without a
    cgroup the peak may be unknown (when this test process's own peak is higher), never wrong."""
    code = "x = 0\nfor i in range(4_000_000): x += i\nb = b'x' * (300 << 20)\n"
    executor = make_executor(cgroups=cgroups)
    outcome = run(execute(command(tmp_path, PYTHON, "-c", code, env={}), executor=executor)).outcome
    assert outcome.exit_code == 0
    assert outcome.usage.user_cpu_seconds is not None
    assert 0.05 < outcome.usage.user_cpu_seconds < 60
    assert outcome.usage.system_cpu_seconds is not None
    peak = outcome.usage.peak_memory_bytes
    if cgroups == "off" and peak is None:
        return
    assert peak is not None
    assert 300 << 20 < peak < 4 << 30


@pytest.mark.parametrize(
    ("limits", "field_name", "cgroups"),
    [
        (ResourceLimits(cpu_cores=1.0), "cpu_cores", "auto"),
        (ResourceLimits(network=False), "network", "auto"),
        pytest.param(
            ResourceLimits(max_processes=64),
            "max_processes",
            "off",
            marks=pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC binds non-root users"),
        ),
    ],
    ids=["cpu", "no-network", "processes-as-root-without-cgroups"],
)
def test_unenforceable_limits_are_refused_or_ignored_as_configured(
    tmp_path: Path, limits: ResourceLimits, field_name: str, cgroups: CgroupMode
) -> None:
    """A limit a plain process cannot honour is refused when so configured, never silently pretended."""
    cmd = sh(tmp_path, "echo 1 > ran", limits=limits)
    refusing = make_executor(refuse=True, cgroups=cgroups)
    with pytest.raises(PreconditionError, match=rf"^limits\.{field_name}=.*cannot enforce it"):
        refusing.check(limits, None)
    with pytest.raises(PreconditionError, match=rf"^limits\.{field_name}=.*cannot enforce it"):
        run(execute(cmd, executor=refusing))
    assert not (tmp_path / "ran").exists()
    make_executor(refuse=False, cgroups=cgroups).check(limits, None)
    outcome = run(execute(cmd, executor=make_executor(refuse=False, cgroups=cgroups))).outcome
    assert outcome.exit_code == 0
    assert (tmp_path / "ran").exists()


def test_network_allowed_or_unset_is_fine(tmp_path: Path) -> None:
    """A plain process always has the host network, so asking for it (or not saying) is honest."""
    executor = make_executor(refuse=True)
    for network in (True, None):
        outcome = run(
            execute(sh(tmp_path, "true", limits=ResourceLimits(network=network)), executor=executor)
        )
        assert outcome.outcome.exit_code == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"cgroups": "maybe"}, "cgroups must be one of"), ({"cgroup_parent": "a/../b"}, "cgroup_parent")],
    ids=["unknown-mode", "parent-with-dotdot"],
)
def test_bad_cgroup_settings_are_configuration_errors(kwargs: dict[str, str], message: str) -> None:
    """A cgroup mode that does not exist, or a parent that could leave the hierarchy, is refused up front."""
    with pytest.raises(ConfigError, match=message):
        HostExecutor(
            kill_grace_seconds=GRACE,
            refuse_unenforceable_limits=True,
            default_limits=ResourceLimits(),
            max_limits=ResourceLimits(),
            **kwargs,  # type: ignore[arg-type]
        )


def test_unenforceable_default_is_a_configuration_error() -> None:
    """A default the executor would refuse on every action is caught when the executor is built."""
    with pytest.raises(ConfigError, match="cpu_cores"):
        make_executor(refuse=True, default_limits=ResourceLimits(cpu_cores=2.0))


@pytest.mark.skipif(not IS_ROOT, reason="RLIMIT_NPROC binds non-root users")
def test_unenforceable_process_default_is_caught_at_start_when_cgroups_cannot_help() -> None:
    """As root without cgroups a default process limit would be refused on every action: a ConfigError."""
    limits = ResourceLimits(max_processes=64)
    with pytest.raises(ConfigError, match="max_processes"):
        make_executor(default_limits=limits, cgroups="off")
    executor = make_executor(default_limits=limits, mountinfo=NO_CGROUP_MOUNTS)
    with pytest.raises(ConfigError, match="max_processes"):
        run(executor.start())


def test_a_closed_executor_is_not_ready_and_says_so() -> None:
    async def scenario() -> Any:
        executor = make_executor(cgroups="off", name="h1")
        await executor.close()
        return await executor.readiness()

    readiness = run(scenario())
    assert not readiness.ready
    assert readiness.message == "host executor 'h1' is closed"


def test_capabilities_without_cgroups_are_truthful_for_this_user() -> None:
    """Process limits count as enforced only when RLIMIT_NPROC binds this user; CPU and network never."""

    async def scenario() -> Any:
        executor = make_executor(cgroups="off")
        return await executor.capabilities(), await executor.readiness(), await executor.warmup(["img"])

    caps, readiness, warmup = run(scenario())
    assert readiness.ready and warmup.ready
    assert caps.readiness.ready
    assert {ResourceLimit.CPU, ResourceLimit.NETWORK} <= caps.unenforced_limits
    assert {ResourceLimit.MEMORY, ResourceLimit.TIMEOUT} <= caps.enforced_limits
    assert (ResourceLimit.PROCESSES in caps.unenforced_limits) == IS_ROOT
    assert (ResourceLimit.PROCESSES in caps.enforced_limits) != IS_ROOT
    assert not caps.enforced_limits & caps.unenforced_limits
    assert caps.details["euid"] == str(os.geteuid())
    assert caps.details["cgroups"] == "off (configured)"
    assert "RLIMIT_AS" in caps.details["memory"]


# ---- cgroups ---------------------------------------------------------------------------------

OWN_CGROUP = "sed -n 's/^[0-9]*:memory:\\(.*\\)$/\\1/p; s/^0::\\(.*\\)$/\\1/p' /proc/self/cgroup | head -n 1"
"""Prints the command's own memory cgroup (v1) or unified cgroup (v2) path."""

ALLOCATE = "import sys; print('started', flush=True); b = b'x' * (int(sys.argv[1]) << 20); print('allocated')"


def memory_root() -> Path:
    """The mount point of the memory hierarchy (v1) or the unified one (v2) the executor uses."""
    mounts = parse_mountinfo(read_mountinfo())
    for mount in mounts:
        if mount.version == 1 and "memory" in mount.controllers:
            return mount.path
    return next(m.path for m in mounts if m.version == 2)


def cgroup_gone_within(path: Path, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@needs_cgroups
def test_each_action_runs_in_its_own_cgroup_which_is_removed_afterwards(tmp_path: Path) -> None:
    """Without reuse, the command is in <parent>/<worker>/<executor>/<token>, and that directory
    is gone after the action."""
    result = run(execute(sh(tmp_path, OWN_CGROUP), executor=make_executor(reuse_cgroups=False)))
    own = result.stdout.decode().strip()
    assert own.startswith(f"/expbuild/{WORKER}/host/"), own
    assert cgroup_gone_within(memory_root() / own.lstrip("/"))


@needs_cgroups
def test_action_cgroups_are_made_ahead_and_none_is_left_after_close(tmp_path: Path) -> None:
    """start() makes SPARE_CGROUPS unused cgroups; an action runs in one of them (with its memory
    limit written when taken), the spares are topped up once no more than SPARE_CGROUPS_LOW are
    left, and close() removes them all."""
    base = memory_root() / "expbuild" / WORKER / "ahead"
    limit = 96 << 20
    limit_file = (
        "memory.limit_in_bytes" if (memory_root() / "memory.limit_in_bytes").exists() else "memory.max"
    )

    def spares() -> set[str]:
        return {p.name for p in base.iterdir() if p.is_dir()}

    async def scenario() -> tuple[set[str], str, list[str], set[str]]:
        executor = make_executor(name="ahead", reuse_cgroups=False)
        await executor.start()
        before = spares()
        script = (
            f'own=$({OWN_CGROUP}); echo "$own"; for f in {limit_file} memory.memsw.limit_in_bytes; '
            f'do [ -e "{memory_root()}$own/$f" ] && cat "{memory_root()}$own/$f"; done; true'
        )
        result = await execute(
            sh(tmp_path, script, limits=ResourceLimits(memory_bytes=limit)), executor=executor
        )
        own, *limits_seen = result.stdout.decode().split()
        after_one = await settled(spares, lambda found: own.rsplit("/", 1)[1] not in found)
        for _ in range(SPARE_CGROUPS - SPARE_CGROUPS_LOW - 1):  # down to the low water mark
            await execute(sh(tmp_path, "true"), executor=executor)
        topped_up = await settled(spares, lambda found: len(found) == SPARE_CGROUPS)
        await executor.close()
        return before, own, limits_seen, after_one, topped_up

    before, own, limits_seen, after_one, topped_up = run(scenario())
    assert len(before) == SPARE_CGROUPS
    assert own.rsplit("/", 1)[1] in before
    assert limits_seen and all(int(seen) == limit for seen in limits_seen)  # memory (and swap, if counted)
    assert len(after_one) == SPARE_CGROUPS - 1 and own.rsplit("/", 1)[1] not in after_one, "not yet topped up"
    assert len(topped_up) == SPARE_CGROUPS and own.rsplit("/", 1)[1] not in topped_up
    assert not base.exists()


@needs_cgroups
def test_close_while_spares_are_being_made_leaves_no_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The action that takes the spares down to the low water mark starts a top-up on the
    housekeeping thread; closing while it runs waits for it and removes what it made."""
    base = memory_root() / "expbuild" / WORKER / "burst"
    create = process_runner.ProcessRunner._create_spares
    slow = threading.Event()

    def slow_create(runner: Any, cgroups: Any, count: int) -> Any:
        made = create(runner, cgroups, count)
        if slow.is_set():
            time.sleep(0.3)  # made, and not yet handed back, when close comes
        return made

    monkeypatch.setattr(process_runner.ProcessRunner, "_create_spares", slow_create)

    async def scenario() -> bool:
        executor = make_executor(name="burst", reuse_cgroups=False)
        await executor.start()
        slow.set()
        for _ in range(SPARE_CGROUPS - SPARE_CGROUPS_LOW):
            await execute(sh(tmp_path, "true"), executor=executor)
        for _ in range(100):  # the top-up is scheduled soon after the last action
            if executor._runner._spares_making is not None:
                break
            await asyncio.sleep(0.001)
        making = executor._runner._spares_making is not None
        await executor.close()
        return making

    assert run(scenario()), "a top-up was on its way when close came"
    assert not base.exists()


async def settled(found: Callable[[], set[str]], done: Callable[[set[str]], bool]) -> set[str]:
    """``found()`` once ``done`` holds for it (2 s at most: the used cgroup goes on a thread)."""
    for _ in range(200):
        seen = found()
        if done(seen):
            return seen
        await asyncio.sleep(0.01)
    return found()


@needs_cgroups
def test_peak_memory_is_the_command_s_own_however_big_the_worker_is(tmp_path: Path) -> None:
    """A 200 MB allocation reports at least 200 MB and a small command a small number, with the test
    process's own peak far above both: the kernel's count for the action, not the spawner's RSS."""
    ballast = b"x" * (600 << 20)
    executor = make_executor()
    big = run(execute(command(tmp_path, PYTHON, "-c", ALLOCATE, "200", env={}), executor=executor)).outcome
    small = run(execute(command(tmp_path, "/bin/sleep", "0.2"), executor=executor)).outcome
    limited = ResourceLimits(memory_bytes=100 << 20)  # enters the cgroup before exec: counted from the start
    tiny = run(execute(command(tmp_path, "/bin/true", limits=limited), executor=executor)).outcome
    del ballast
    assert big.exit_code == 0 and small.exit_code == 0 and tiny.exit_code == 0
    assert big.usage.peak_memory_bytes is not None
    assert 200 << 20 <= big.usage.peak_memory_bytes < 600 << 20
    for outcome in (small, tiny):
        assert outcome.usage.peak_memory_bytes is not None
        assert 0 < outcome.usage.peak_memory_bytes < 64 << 20
        assert outcome.usage.user_cpu_seconds is not None and outcome.usage.system_cpu_seconds is not None


@needs_cgroups
def test_memory_limit_ends_a_big_allocation_as_oom_killed(tmp_path: Path) -> None:
    """Past a 64 MB limit the kernel kills the command: OOM_KILLED, naming the limit, output kept."""
    limits = ResourceLimits(memory_bytes=64 << 20)
    result = run(execute(command(tmp_path, PYTHON, "-c", ALLOCATE, "300", env={}, limits=limits)))
    assert result.stdout == b"started\n"
    assert result.outcome.status is ExecutionStatus.OOM_KILLED
    assert result.outcome.signal == 9
    assert str(64 << 20) in result.outcome.message
    assert result.outcome.usage.peak_memory_bytes is not None
    assert result.outcome.usage.peak_memory_bytes <= 64 << 20


@needs_cgroups
def test_default_memory_limit_applies_through_the_cgroup(tmp_path: Path) -> None:
    """An action without a limit gets the default as a cgroup limit, not an address-space rlimit."""
    executor = make_executor(default_limits=ResourceLimits(memory_bytes=64 << 20))
    unlimited_as = run(execute(sh(tmp_path, "ulimit -v"), executor=executor)).stdout
    outcome = run(
        execute(command(tmp_path, PYTHON, "-c", ALLOCATE, "300", env={}), executor=executor)
    ).outcome
    assert unlimited_as == b"unlimited\n"
    assert outcome.status is ExecutionStatus.OOM_KILLED


@needs_cgroups
def test_oom_kill_of_a_child_wins_over_the_stop_reason(tmp_path: Path) -> None:
    """A child killed for memory makes the action OOM_KILLED even if the command then times out."""
    script = f'{PYTHON} -c "$0" 300; echo after-oom; sleep 600'

    async def scenario() -> Result:
        stop = StopSignal()
        seen: list[ExecutorEvent] = []
        cmd = command(
            tmp_path, "/bin/sh", "-c", script, ALLOCATE, limits=ResourceLimits(memory_bytes=64 << 20)
        )
        events = make_executor().execute(cmd, stop)
        await until_stdout(events, b"after-oom", seen)
        stop.request(ExecutionStatus.TIMED_OUT)
        return await collect(events, seen)

    outcome = run(scenario()).outcome
    assert outcome.status is ExecutionStatus.OOM_KILLED
    assert "memory" in outcome.message


@needs_cgroups
def test_a_100m_memory_limit_does_not_break_a_small_program(tmp_path: Path) -> None:
    """A cgroup limit bounds memory used, not address space, so /bin/true under 100 MB just runs."""
    outcome = run(
        execute(command(tmp_path, "/bin/true", limits=ResourceLimits(memory_bytes=100 << 20)))
    ).outcome
    assert outcome.status is ExecutionStatus.COMPLETED
    assert outcome.exit_code == 0
    assert outcome.signal is None


FORKER = """
import os, sys, time
pids = []
for _ in range(200):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(600)
        os._exit(0)
    pids.append(pid)
print(" ".join(map(str, pids)), flush=True)
"""


@needs_cgroups
def test_process_limit_contains_a_fork_bomb_even_for_root(tmp_path: Path) -> None:
    """pids.max stops forking at the limit (RLIMIT_NPROC would not bind root), and every child dies."""
    limits = ResourceLimits(max_processes=16)
    result = run(execute(command(tmp_path, PYTHON, "-c", FORKER, env={}, limits=limits)))
    children = [int(pid) for pid in result.stdout.split()]
    assert result.outcome.status is ExecutionStatus.COMPLETED
    assert 0 < len(children) < 16
    assert all(wait_gone(pid) for pid in children)


@needs_cgroups
def test_a_process_that_left_the_session_dies_with_the_action(tmp_path: Path) -> None:
    """A setsid escapee (still holding stdout) is killed when the action ends, and ends it promptly."""
    script = "setsid /bin/sh -c 'echo $$ > escapee; exec sleep 600' & echo started; sleep 0.2"
    began = time.monotonic()
    result = run(execute(sh(tmp_path, script)))
    assert time.monotonic() - began < 5
    assert result.outcome.status is ExecutionStatus.COMPLETED
    assert result.outcome.exit_code == 0
    assert result.stdout == b"started\n"
    assert wait_gone(int((tmp_path / "escapee").read_text()))


def test_cgroup_owner_is_this_process_only_with_its_pid_and_start_time() -> None:
    """A token names its worker by pid and start time: ours is alive; one with our pid but another
    start (a crashed predecessor that had our pid), a dead pid or a malformed name is stale."""
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    assert _owner_alive(_new_token())
    assert not _owner_alive(f"{os.getpid()}.1-1")
    assert not _owner_alive(f"{dead.pid}-3")  # the older form: the pid alone decides
    assert _owner_alive(f"{os.getpid()}-3")
    assert not _owner_alive("nonsense")


@needs_cgroups
@pytest.mark.parametrize("owner", ["dead pid", "our pid, earlier start"])
def test_a_stale_cgroup_of_a_previous_run_is_swept_at_start(tmp_path: Path, owner: str) -> None:
    """What a dead worker left (a cgroup with a process still in it) is killed and removed at start,
    also when that worker had the pid this process has now (a restarted container's pid 1)."""
    cgroups = ActionCgroups.for_host(
        mountinfo=read_mountinfo(), parent="expbuild", worker_id=WORKER, executor="sweep-test"
    )
    if owner == "dead pid":
        dead = subprocess.Popen(["/bin/true"])
        dead.wait()
        token = f"{dead.pid}-7"
    else:
        token = f"{os.getpid()}.1-1"  # our pid, but a process that started at boot
    leaf = cgroups.create(token, memory_bytes=None, max_processes=None)
    orphan = subprocess.Popen(["/bin/sleep", "600"])
    try:
        leaf.attach(orphan.pid)

        async def scenario() -> None:
            executor = make_executor(name="sweep-test")
            await executor.start()
            await executor.close()

        run(scenario())
        orphan.wait(timeout=5)
        assert orphan.returncode == -9
        assert not any(Path(d).exists() for d in leaf.dirs)
    finally:
        orphan.kill()
        orphan.wait()
        leaf.kill()
        leaf.remove()


def test_required_cgroups_that_cannot_be_created_stop_the_start() -> None:
    """cgroups = "required" where none can be made is an error at start naming the executor and why."""
    with pytest.raises(
        PreconditionError, match=r"host executor 'host': cgroups = \"required\" but cannot create"
    ):
        run(make_executor(cgroups="required", mountinfo=NO_CGROUP_MOUNTS).start())


def test_auto_cgroups_fall_back_to_rlimits_and_say_so() -> None:
    """cgroups = "auto" where none can be made runs with rlimits, and the capabilities say why."""
    caps = run(make_executor(mountinfo=NO_CGROUP_MOUNTS).capabilities())
    assert caps.details["cgroups"].startswith("unavailable (cannot create cgroup /proc/1/")
    assert "RLIMIT_AS" in caps.details["memory"]


@needs_cgroups
def test_capabilities_with_cgroups_enforce_memory_and_processes() -> None:
    """With cgroups, memory and process limits are enforced for every user; CPU and network still not."""
    caps = run(make_executor().capabilities())
    assert {ResourceLimit.MEMORY, ResourceLimit.PROCESSES, ResourceLimit.TIMEOUT} <= caps.enforced_limits
    assert {ResourceLimit.CPU, ResourceLimit.NETWORK} <= caps.unenforced_limits
    assert caps.details["cgroups"].startswith("v")
    assert "cgroup" in caps.details["memory"] and "pids.max" in caps.details["processes"]


# ---- the starters (commands of another user are never forked by the worker itself) --------------

NOBODY = (65534, 65534)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="only root runs commands as another user")


@pytest.fixture(params=["native", "fork"])
def starter_kind(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Executors made in the test start placed commands with the native helper (the default,
    once built), or, as where it is not built, through the spawner process."""
    if request.param == "fork":
        monkeypatch.setattr(process_runner, "_native_helper", lambda: None)
    return str(request.param)


@pytest.fixture
def spawner_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Executors made in the test use the spawner process (no native helper)."""
    monkeypatch.setattr(process_runner, "_native_helper", lambda: None)


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory an unprivileged command can reach (pytest's own are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="expbuild-spawner-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_commands_of_another_user_run_with_stdin_limits_and_exit_codes(
    public_dir: Path, starter_kind: str
) -> None:
    """Through either starter, a command gets its user, stdin, rlimit-free cgroup, exit code and usage."""
    script = "id -u; id -G; cat; exit 3"
    result = run(execute(sh(public_dir, script, stdin=b"in\n"), executor=make_executor(run_as=NOBODY)))
    assert result.stdout == b"65534\n65534\nin\n"
    assert result.outcome.status is ExecutionStatus.COMPLETED and result.outcome.exit_code == 3
    assert result.outcome.usage.user_cpu_seconds is not None


@needs_root
def test_a_command_the_starter_cannot_start_fails_to_start_naming_it(
    public_dir: Path, starter_kind: str
) -> None:
    """A missing working directory is FAILED_TO_START with the same message as a vfork spawn's."""
    cmd = command(public_dir, "/bin/true", working_directory="missing")
    result = run(execute(cmd, executor=make_executor(run_as=NOBODY)))
    assert result.outcome.status is ExecutionStatus.FAILED_TO_START
    assert "working directory 'missing'" in result.outcome.message


@needs_root
@pytest.mark.usefixtures("spawner_only")
def test_a_spawner_that_dies_ends_its_commands_and_is_replaced(public_dir: Path) -> None:
    """Killing the spawner kills what it started (nothing leaks), the action ends at once saying its
    status is lost, and the next command gets a new spawner."""

    async def scenario() -> tuple[Result, Result, int]:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        spawner = executor._runner.starter
        assert spawner.pid is not None
        seen: list[ExecutorEvent] = []
        events = executor.execute(sh(public_dir, SPAWNS_GRANDCHILD), StopSignal())
        await until_stdout(events, b"ready", seen)
        os.kill(spawner.pid, signal.SIGKILL)
        first = await collect(events, seen)
        second = await execute(sh(public_dir, "echo again"), executor=executor)
        return first, second, spawner.started

    first, second, started = run(scenario())
    assert first.outcome.status is ExecutionStatus.INTERNAL
    assert "exit status is lost" in first.outcome.message
    assert wait_gone(int((public_dir / "leader").read_text()))
    assert wait_gone(int((public_dir / "grandchild").read_text()))
    assert second.stdout == b"again\n" and started == 2


@needs_root
@pytest.mark.usefixtures("spawner_only")
def test_close_stops_the_spawner(public_dir: Path) -> None:
    """A closed executor leaves no spawner process behind."""

    async def scenario() -> int:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        pid = executor._runner.starter.pid
        assert pid is not None
        await executor.close()
        return pid

    assert wait_gone(run(scenario()))


# ---- children placed ahead of need (no fork or cgroup migration on the command's path) ---------


def _placed_children(starter: Starter) -> set[int]:
    """The starter's children that have not become a command yet: placed ones."""
    return placed_children(starter.pid if starter.pid is not None else os.getpid())


@needs_root
@needs_cgroups
def test_a_command_runs_in_a_child_placed_in_its_cgroup_ahead_with_its_user_and_limits(
    public_dir: Path, starter_kind: str
) -> None:
    """Without reuse, the spare cgroups have the starter's children waiting in them; a command
    execs in one: it is that child's pid, runs as the configured user, in its own cgroup under its memory and
    process limits; its spare is replaced by a newly placed one."""
    limits = ResourceLimits(memory_bytes=64 << 20, max_processes=5)
    script = (
        "echo $$; id -u; grep -E ':(memory|pids):' /proc/self/cgroup; for i in 1 2 3 4 5 6; do sleep 1 & done"
    )

    async def scenario() -> tuple[set[int], Result, set[int], str]:
        executor = make_executor(
            run_as=NOBODY, default_limits=ResourceLimits(max_processes=64), reuse_cgroups=False
        )
        await executor.start()
        starter = executor._runner.starter
        for _ in range(100):  # placed after the answer to each request
            before = _placed_children(starter)
            if len(before) >= 4:
                break
            await asyncio.sleep(0.02)
        result = await execute(sh(public_dir, script, limits=limits), executor=executor)
        await asyncio.sleep(0.2)
        after = _placed_children(starter)
        cgroups = executor._runner._cgroups
        assert cgroups is not None
        return before, result, after, cgroups.base

    before, result, after, base = run(scenario())
    assert len(before) >= 4, before
    lines = result.stdout.decode().splitlines()
    assert int(lines[0]) in before, "the command is one of the placed children"
    assert lines[1] == "65534"
    homes = {line.split(":", 2)[2] for line in lines[2:]}
    assert len(lines) == 4 and len(homes) == 1 and homes.pop().startswith(base + "/"), lines
    assert int(lines[0]) not in after and len(after) >= 4, "its spare was replaced"
    assert b"fork" in result.stderr.lower(), "the process limit of 5 holds in the placed child's cgroup"


_CGROUP_PROCS_OWNER = (
    "while IFS=: read -r _ controllers path; do case $controllers in"
    ' memory) stat -c %u "/sys/fs/cgroup/memory$path/cgroup.procs"; exit;;'
    ' "") stat -c %u "/sys/fs/cgroup$path/cgroup.procs"; exit;;'
    " esac; done < /proc/self/cgroup"
)
"""Prints the owner of the command's own memory cgroup's ``cgroup.procs`` (v1 or v2)."""


@needs_root
@needs_cgroups
def test_the_action_user_owns_its_cgroup_procs_only_where_its_child_must_write_it(
    public_dir: Path, starter_kind: str
) -> None:
    """The native helper enters the action's cgroup as root before it switches user, so the
    command's user gets no cgroup file; a fork of the spawner enters after the switch and needs
    its ``cgroup.procs`` handed over."""
    limits = ResourceLimits(memory_bytes=64 << 20)
    cmd = sh(public_dir, _CGROUP_PROCS_OWNER, limits=limits)
    result = run(execute(cmd, executor=make_executor(run_as=NOBODY)))
    assert result.outcome.exit_code == 0, result.stderr
    assert result.stdout.decode().strip() == ("0" if starter_kind == "native" else str(NOBODY[0]))


@needs_root
@needs_cgroups
def test_a_placed_child_that_cannot_start_the_command_fails_to_start_naming_why(
    public_dir: Path, starter_kind: str
) -> None:
    """A missing argv[0] and a missing working directory are FAILED_TO_START with the same words
    through a placed child as through a fork; the next command still runs."""

    async def scenario() -> tuple[Result, Result, Result]:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        missing = await execute(command(public_dir, "/bin/not-there"), executor=executor)
        no_dir = await execute(
            command(public_dir, "/bin/true", working_directory="missing"), executor=executor
        )
        fine = await execute(sh(public_dir, "echo fine"), executor=executor)
        return missing, no_dir, fine

    missing, no_dir, fine = run(scenario())
    assert missing.outcome.status is ExecutionStatus.FAILED_TO_START
    assert "'/bin/not-there'" in missing.outcome.message and "No such file" in missing.outcome.message
    assert no_dir.outcome.status is ExecutionStatus.FAILED_TO_START
    assert "working directory 'missing'" in no_dir.outcome.message
    assert fine.stdout == b"fine\n"


@needs_root
@needs_cgroups
def test_placed_children_killed_from_outside_are_replaced_by_a_plain_spawn(
    public_dir: Path, starter_kind: str
) -> None:
    """A placed child that died (someone killed it) is never used: the command gets a child
    started for it (a new helper, or a fork of the spawner)."""

    async def scenario() -> tuple[int, Result]:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        for _ in range(250):
            placed = _placed_children(executor._runner.starter)
            if len(placed) >= SPARE_CGROUPS:
                break
            await asyncio.sleep(0.02)
        for pid in placed:
            os.kill(pid, signal.SIGKILL)
        await asyncio.sleep(0.1)
        return len(placed), await execute(sh(public_dir, "id -u"), executor=executor)

    killed, result = run(scenario())
    assert killed >= SPARE_CGROUPS, "every spare had its child, all killed"
    assert result.stdout == b"65534\n"


# ---- a uid of its own per running action (run_as_uids) ----------------------------------------

UIDS = range(231000, 231002)  # unused on test machines; two, to prove reuse


@needs_root
def test_concurrent_actions_with_their_own_uids_cannot_signal_or_enter_each_other(public_dir: Path) -> None:
    """Two actions running at once get different uids: the second can neither signal the first
    nor list its directory; each uid is taken back and reused once its action has ended."""
    shared = public_dir / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    first_root, second_root = public_dir / "first", public_dir / "second"
    for root in (first_root, second_root):
        root.mkdir()
    first_script = f"id -u; echo $$ > {shared}/first.pid; sleep 30"
    second_script = (
        f"id -u; kill -0 $(cat {shared}/first.pid) 2>/dev/null && echo signalled || echo refused; "
        f"ls {first_root} >/dev/null 2>&1 && echo entered || echo kept-out"
    )

    async def scenario() -> tuple[Result, Result, list[bytes]]:
        executor = make_executor(run_as_uids=UIDS)
        await executor.start()
        stop = StopSignal()
        seen: list[ExecutorEvent] = []
        first = executor.execute(sh(first_root, first_script), stop)
        await until_stdout(first, b"\n", seen)
        for _ in range(200):
            if (shared / "first.pid").exists() and (shared / "first.pid").read_text().strip():
                break
            await asyncio.sleep(0.01)
        second = await execute(sh(second_root, second_script), executor=executor)
        stop.request(ExecutionStatus.CANCELLED)
        first_result = await collect(first, seen)
        later = []
        for i in range(4):  # more actions than uids: each uid came back
            root = public_dir / f"later{i}"
            root.mkdir()
            later.append((await execute(sh(root, "id -u"), executor=executor)).stdout)
        return first_result, second, later

    first, second, later = run(scenario())
    first_uid = int(first.stdout.split()[0])
    second_lines = second.stdout.decode().split()
    assert first_uid in UIDS and int(second_lines[0]) in UIDS and int(second_lines[0]) != first_uid
    assert second_lines[1:] == ["refused", "kept-out"], second_lines
    assert all(int(out) in UIDS for out in later), later
    assert first.outcome.status is ExecutionStatus.CANCELLED


def test_capabilities_name_the_uid_range() -> None:
    """Capabilities say each command has a uid of its own, and which."""
    caps = run(make_executor(run_as_uids=UIDS).capabilities())
    assert caps.details["euid"] == "231000-231001"
    assert "uid of its own" in caps.details["user"]


@needs_root
def test_a_single_uid_serves_back_to_back_actions(public_dir: Path) -> None:
    """With one uid for one slot, the next action waits the moment it takes for the last one's
    cgroup to go (its uid comes back then) instead of failing."""

    async def scenario() -> list[Result]:
        executor = make_executor(run_as_uids=range(231010, 231011))
        await executor.start()
        results = []
        for i in range(6):
            root = public_dir / f"a{i}"
            root.mkdir()
            results.append(await execute(sh(root, "id -u"), executor=executor))
        return results

    for result in run(scenario()):
        assert result.outcome.status is ExecutionStatus.COMPLETED and result.stdout == b"231010\n", result


# ---- reused action cgroups (cgroup v1, native helper) --------------------------------------------


def _reuses_cgroups() -> str:
    """Why this machine runs without reused cgroups ('' when it reuses them)."""
    if CGROUPS_UNAVAILABLE:
        return CGROUPS_UNAVAILABLE
    if not any(m.version == 1 and "memory" in m.controllers for m in parse_mountinfo(read_mountinfo())):
        return "cgroup v2 only: its CPU time and peak memory cannot be reset, so cgroups are not reused"
    if process_runner._native_helper() is None:
        return "the native helper is not built (make agent)"
    return ""


needs_reuse = pytest.mark.skipif(bool(_reuses_cgroups()), reason=_reuses_cgroups() or "reuses")

CGROUP_AND_MEMBERS = f'own=$({OWN_CGROUP}); echo "$own"; echo $(cat "{memory_root()}$own/cgroup.procs")'
"""Prints the command's own cgroup, then on one line the pids in it (its own among them)."""


async def back_in_line(executor: HostExecutor, cgroup: str) -> bool:
    """Until the cgroup ``cgroup`` (a path as the command saw it) is next in line for an action
    (its check for reuse runs on a thread after the action); False if it never is (2 s)."""
    token = cgroup.rsplit("/", 1)[1]
    spares = executor._runner._spare_cgroups
    for _ in range(200):
        if spares and spares[0].token == token:
            return True
        await asyncio.sleep(0.01)
    return False


def _members(result: Result) -> tuple[str, set[int]]:
    lines = result.stdout.decode().splitlines()
    assert len(lines) >= 2, result
    own, members = lines[:2]
    return own, {int(pid) for pid in members.split()}


@needs_root
@needs_reuse
def test_a_reused_cgroup_keeps_nothing_of_the_previous_action(public_dir: Path) -> None:
    """Back-to-back actions run in one cgroup, each started by the same resident helper (which the
    action user cannot signal): what the first left running is killed before the second starts,
    and the second's peak memory and CPU time are its own, not the first's."""
    first_script = (
        f"{CGROUP_AND_MEMBERS}; setsid sh -c 'echo $$ > {public_dir}/left; exec sleep 600' & "
        f'for pid in $(cat "{memory_root()}$own/cgroup.procs"); do '
        'grep -q -- --reside""nt /proc/$pid/cmdline 2>/dev/null && '
        "{ kill -9 $pid 2>/dev/null && echo killed $pid || echo refused $pid; }; done; "
        "i=0; while [ $i -lt 30000 ]; do i=$((i+1)); done; "
        "dd if=/dev/zero of=/dev/null bs=120M count=1 2>/dev/null"
    )

    async def scenario() -> tuple[Result, Result, bool]:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        first = await execute(sh(public_dir, first_script), executor=executor)
        own = first.stdout.decode().splitlines()[0]
        in_line = await back_in_line(executor, own)
        second = await execute(sh(public_dir, CGROUP_AND_MEMBERS), executor=executor)
        return first, second, in_line

    first, second, in_line = run(scenario())
    assert first.outcome.exit_code == 0 and second.outcome.exit_code == 0, (first, second)
    assert b"refused" in first.stdout and b"killed" not in first.stdout, (
        "the action user cannot signal its helper"
    )
    (own, first_members), (again, second_members) = _members(first), _members(second)
    assert in_line and own == again, "the cgroup was reused"
    helpers = {pid for pid in first_members if is_worker_helper(pid)}
    assert len(helpers) == 1 and helpers <= second_members, "one resident helper, the same for both"
    left = int((public_dir / "left").read_text())
    assert left not in second_members and wait_gone(left), "what the first action left was killed"
    first_usage, second_usage = first.outcome.usage, second.outcome.usage
    assert first_usage.peak_memory_bytes is not None and second_usage.peak_memory_bytes is not None
    assert first_usage.peak_memory_bytes >= 120 << 20
    assert second_usage.peak_memory_bytes < 16 << 20, second_usage
    assert first_usage.user_cpu_seconds is not None and second_usage.user_cpu_seconds is not None
    assert second_usage.user_cpu_seconds < first_usage.user_cpu_seconds, (first_usage, second_usage)


@needs_root
@needs_reuse
def test_a_reused_cgroup_reports_oom_once_and_takes_each_action_s_limits(public_dir: Path) -> None:
    """An OOM kill in a reused cgroup is that action's alone (the next one in the same cgroup
    completes), the resident helper survives it, and each action gets its own limits however
    they compare with the previous one's: lower, higher, none, and an exact process limit."""
    dd = "dd if=/dev/zero of=/dev/null bs={}M count=1 2>/dev/null"
    actions = [
        (ResourceLimits(memory_bytes=48 << 20), dd.format(200)),
        (ResourceLimits(memory_bytes=48 << 20), "true"),
        (ResourceLimits(memory_bytes=256 << 20), dd.format(150)),
        (ResourceLimits(memory_bytes=96 << 20), dd.format(50)),  # lower again
        (ResourceLimits(), dd.format(150)),
        (ResourceLimits(max_processes=5), "sleep 1 & " * 4 + "wait"),  # sh and four: allowed
        (ResourceLimits(max_processes=5), "sleep 1 & " * 5 + "wait"),  # one too many
    ]

    async def scenario() -> tuple[list[Result], list[bool], list[set[int]]]:
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        results, in_line, helpers = [], [], []
        for limits, script in actions:
            result = await execute(
                sh(public_dir, f"{CGROUP_AND_MEMBERS}; {script}", limits=limits), executor=executor
            )
            results.append(result)
            helpers.append({pid for pid in _members(result)[1] if is_worker_helper(pid)})
            in_line.append(await back_in_line(executor, result.stdout.decode().splitlines()[0]))
        return results, in_line, helpers

    results, in_line, helpers = run(scenario())
    statuses = [(r.outcome.status, r.outcome.exit_code) for r in results]
    assert statuses[0][0] is ExecutionStatus.OOM_KILLED, results[0]
    assert all(status == (ExecutionStatus.COMPLETED, 0) for status in statuses[1:6]), results
    assert statuses[6][0] is ExecutionStatus.COMPLETED and b"fork" in results[6].stderr.lower(), results[6]
    assert b"fork" not in results[5].stderr.lower(), results[5]
    cgroups = {_members(r)[0] for r in results}
    assert len(cgroups) == 1 and all(in_line[:-1]), "one cgroup served every action"
    # (the last one's processes, killed at its end, may leave more than RESIDUE_BYTES charged for
    # a moment: then its cgroup is removed, which is the rule, so it is not asked to be reused)
    assert len(helpers[0]) == 1 and all(h == helpers[0] for h in helpers), "the helper outlived the OOM kill"


@needs_reuse
def test_a_cgroup_left_holding_memory_is_removed_not_reused(tmp_path: Path) -> None:
    """Memory an action leaves charged to its cgroup (here a tmpfs file) would count as the next
    action's: past RESIDUE_BYTES the cgroup is removed, and the next action gets another."""
    residue = Path("/dev/shm") / f"expbuild-residue-{os.getpid()}"
    script = f"{OWN_CGROUP}; head -c {4 * RESIDUE_BYTES} /dev/zero > {residue}"

    async def scenario() -> tuple[bool, Result, bool, Result]:
        executor = make_executor()
        await executor.start()
        clean = await execute(sh(tmp_path, OWN_CGROUP), executor=executor)
        reused = await back_in_line(executor, clean.stdout.decode().strip())
        first = await execute(sh(tmp_path, script), executor=executor)
        own = first.stdout.decode().strip()
        gone = await asyncio.to_thread(cgroup_gone_within, memory_root() / own.lstrip("/"))
        second = await execute(sh(tmp_path, OWN_CGROUP), executor=executor)
        return reused, first, gone, second

    try:
        reused, first, gone, second = run(scenario())
    finally:
        residue.unlink(missing_ok=True)
    assert reused, "a clean cgroup is reused (the control)"
    assert first.outcome.exit_code == 0, first
    assert gone, "the cgroup holding the file's pages was removed"
    assert second.stdout.decode().strip() != first.stdout.decode().strip()


@needs_reuse
def test_concurrent_actions_never_share_a_cgroup(tmp_path: Path) -> None:
    """Actions running at the same time each have a cgroup of their own, reused or not."""

    async def scenario() -> list[list[str]]:
        executor = make_executor()
        await executor.start()
        rounds = []
        for _ in range(3):
            results = await asyncio.gather(
                *(execute(sh(tmp_path, f"{OWN_CGROUP}; sleep 0.2"), executor=executor) for _ in range(6))
            )
            rounds.append([r.stdout.decode().strip() for r in results])
        return rounds

    rounds = run(scenario())
    for cgroups in rounds:
        assert len(set(cgroups)) == 6, cgroups
    assert len({cgroup for cgroups in rounds for cgroup in cgroups}) < 18, "later rounds reused cgroups"


def _zombie_children() -> set[int]:
    """This process's children that ended and were never reaped."""
    return {pid for pid, state in children(os.getpid()).items() if state == b"Z"}


async def no_zombie_children(before: set[int], seconds: float = 5.0) -> set[int]:
    """Until this process has no unreaped child but those ``before`` (the executor's clean-ups
    run on its loop): the others still there after ``seconds``."""
    for _ in range(int(seconds / 0.02)):
        if not _zombie_children() - before:
            break
        await asyncio.sleep(0.02)
    return _zombie_children() - before


@needs_reuse
def test_a_command_the_resident_helper_cannot_clone_fails_to_start(tmp_path: Path) -> None:
    """With no process left under pids.max for the command (the helper fills it), the clone
    fails: FAILED_TO_START naming why, the worker untouched, the next action fine."""

    async def scenario() -> tuple[Result, Result]:
        executor = make_executor()
        await executor.start()
        refused = await execute(
            command(tmp_path, "/bin/true", limits=ResourceLimits(max_processes=0)), executor=executor
        )
        fine = await execute(sh(tmp_path, "echo fine"), executor=executor)
        return refused, fine

    refused, fine = run(scenario())
    assert refused.outcome.status is ExecutionStatus.FAILED_TO_START, refused
    assert "could not start the command" in refused.outcome.message, refused.outcome.message
    assert fine.stdout == b"fine\n"


@needs_reuse
@pytest.mark.parametrize("how", ["cancelled", "executor-closed"])
def test_a_start_given_up_during_the_hand_over_leaves_no_process_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    """A start given up once the command went to its resident helper (its consumer cancelled, or
    the executor closed): the command is killed and reaped, the helper ends only after that
    start is over, and nothing is left unreaped. Whether the exec was confirmed by then is the
    machine's timing; each action tries both moments (at once, and once the clone exists)."""
    real_watch = helper_starter_module._ResidentStart.watch
    moments: list[str] = []
    executors: list[HostExecutor] = []
    closing: list[asyncio.Future[None]] = []

    def watch_then_give_up(self: Any) -> None:
        before = set(children(os.getpid()))
        real_watch(self)
        if len(moments) >= 2 or (how == "executor-closed" and moments):
            return
        if len(moments) == 1:  # the second action: once the clone exists
            wait_until(lambda: set(children(os.getpid())) - before, 2, interval=0.001)
        moments.append("pending" if not self._answer.done() else "confirmed")
        if how == "cancelled":
            self._answer.cancel()  # as a consumer that went away at this very moment
        else:
            closing.append(asyncio.ensure_future(executors[0].close()))

    monkeypatch.setattr(helper_starter_module._ResidentStart, "watch", watch_then_give_up)

    async def scenario() -> tuple[list[str], set[int]]:
        before = _zombie_children()  # earlier tests' (whose loops ended before their reaps)
        executors.append(make_executor())
        await executors[0].start()
        ends = []
        for n in range(2 if how == "cancelled" else 1):
            try:
                result = await execute(sh(tmp_path, f"sleep 0.2; touch ran-{n}"), executor=executors[0])
                ends.append(f"{result.outcome.status.value}: {result.outcome.message}")
            except (asyncio.CancelledError, UnavailableError) as err:
                ends.append(type(err).__name__)
        if closing:
            await closing[0]
        await asyncio.sleep(0.5)  # a command left running would have written its file by now
        return ends, await no_zombie_children(before)

    ends, unreaped = run(scenario())
    assert moments, "a start was given up"
    for n, (moment, end) in enumerate(zip(moments, ends, strict=True)):
        ran = (tmp_path / f"ran-{n}").exists()
        if how == "executor-closed":
            assert (end.startswith("cancelled:") or end == "UnavailableError") and not ran, (moment, end, ran)
        elif moment == "pending":
            assert end == "CancelledError" and not ran, (moment, end, ran)
        else:  # its exec was confirmed before the cancel: nothing was given up, it ran
            assert end == "completed: " and ran, (moment, end, ran)
    assert not unreaped


@needs_root
@needs_reuse
def test_a_resident_helper_killed_during_an_action_is_replaced_and_its_cgroup_let_go(
    public_dir: Path,
) -> None:
    """The helper dies while its cgroup's action runs: the action still completes, the cgroup is
    not reused (nothing proves it clean), the next action runs elsewhere, and the dead helper is
    reaped."""
    marker = public_dir / "cgroup"
    script = f"{OWN_CGROUP} > {marker}; sleep 0.5; echo done"

    async def scenario() -> tuple[Result, str, int, bool, Result, set[int]]:
        before = _zombie_children()  # earlier tests' (whose loops ended before their reaps)
        executor = make_executor(run_as=NOBODY)
        await executor.start()
        task = asyncio.ensure_future(execute(sh(public_dir, script), executor=executor))
        await until_exists(marker)
        own = marker.read_text().strip()
        members = {int(pid) for pid in (memory_root() / own.lstrip("/") / "cgroup.procs").read_text().split()}
        helpers = [pid for pid in members if is_worker_helper(pid)]
        for pid in helpers:
            os.kill(pid, signal.SIGKILL)
        first = await task
        gone = await asyncio.to_thread(cgroup_gone_within, memory_root() / own.lstrip("/"))
        second = await execute(sh(public_dir, OWN_CGROUP), executor=executor)
        return first, own, len(helpers), gone, second, await no_zombie_children(before)

    first, own, killed, gone, second, unreaped = run(scenario())
    assert killed == 1, "its one resident helper was killed"
    assert first.stdout == b"done\n" and first.outcome.exit_code == 0, first
    assert gone, "the cgroup was let go, not reused"
    assert second.stdout.decode().strip() != own and second.outcome.exit_code == 0, second
    assert not unreaped, "the dead helper is reaped once its cgroup is let go"


@needs_reuse
def test_commands_in_a_reused_cgroup_keep_the_worker_s_oom_score(tmp_path: Path) -> None:
    """The resident helper keeps the OOM killer off itself where it may; every command started
    from it has the score the worker's commands would have, the first and the later ones."""
    own = Path("/proc/self/oom_score_adj").read_text().strip()

    async def scenario() -> list[Result]:
        executor = make_executor()
        await executor.start()
        results = []
        for _ in range(3):
            results.append(
                await execute(sh(tmp_path, f"{OWN_CGROUP}; cat /proc/self/oom_score_adj"), executor=executor)
            )
            await back_in_line(executor, results[-1].stdout.decode().split()[0])
        return results

    lines = [r.stdout.decode().split() for r in run(scenario())]
    assert len({cgroup for cgroup, _ in lines}) == 1, "one cgroup, one helper, for all three"
    assert [score for _, score in lines] == [own] * 3
