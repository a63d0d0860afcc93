"""Placed children, from both starters (the native helper started by the worker itself, or forks
of the spawner process): a command execs in a child started ahead of need, and every way it can
fail to start is reported as a forked spawn's failure would be, with nothing left behind."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from _support import placed_children, wait_until

from expbuild_worker.errors import UnavailableError
from expbuild_worker.execution.agent import bundled_agent, usable_agent
from expbuild_worker.execution.proc_stat import PARENT, STATE, stat_fields
from expbuild_worker.execution.process import _helper_starter as helper_starter_module
from expbuild_worker.execution.process import _spawner as spawner_module
from expbuild_worker.execution.process._helper_starter import HelperStarter
from expbuild_worker.execution.process._spawn import SpawnFailure, Starter, spawn, started
from expbuild_worker.execution.process._spawner import Spawner

ENV = {"PATH": "/usr/bin:/bin"}


@pytest.fixture(params=["native", "fork"])
def starter(request: pytest.FixtureRequest) -> Iterator[Starter]:
    """The worker's own starter of native helpers, or the spawner process with its forks."""
    helper = bundled_agent()
    if request.param == "native":
        assert not usable_agent(helper), usable_agent(helper)  # `make agent` builds it; the suite needs it
    yield from _started(HelperStarter(helper) if request.param == "native" else Spawner(name="unit"))


@pytest.fixture
def spawner() -> Iterator[Spawner]:
    """The spawner process alone (what only it does: answers that come later, hanging)."""
    yield from _started(Spawner(name="unit"))


_S = TypeVar("_S", bound=Starter)


def _started(made: _S) -> Iterator[_S]:
    made.start()
    try:
        yield made
    finally:
        made.close()


def _parent(starter: Starter) -> int:
    """Whose children the starter's commands are: the spawner's, or this process's."""
    return starter.pid if starter.pid is not None else os.getpid()


def _placed(starter: Starter, join: list[str]) -> None:
    """Place a child for ``join`` and wait (5 s at most) until it is there."""
    starter.place([join])

    def there() -> bool:
        waiting = bool(placed_children(_parent(starter)))
        return waiting and not getattr(starter, "_pending", None)

    assert wait_until(there, 5), "the child was placed"


async def _start(
    starter: Starter, tmp_path: Path, join: list[str], argv: list[str], env: dict[str, str]
) -> int:
    child = await _spawn(starter, tmp_path, join, argv, env)
    assert child.exec_status is not None, "the placed child was used"
    try:
        await started(child, argv0=argv[0], cwd=tmp_path, working_directory="")
    finally:
        await asyncio.sleep(0.3)  # a failed child is reaped in the background
    for fd in (child.stdout_fd, child.stderr_fd, child.pidfd):
        os.close(fd)
    while child.reap() is None:
        await asyncio.sleep(0.005)
    return child.pid


def _spawn(starter: Starter, cwd: Path, join: list[str], argv: list[str], env: dict[str, str]) -> Any:
    """spawn() of ``argv`` (argv[0] is the executable) in ``cwd`` with nothing but ``join``."""
    return spawn(
        argv=argv,
        executable=argv[0],
        cwd=cwd,
        working_directory="",
        environment=env,
        stdin=b"",
        rlimits=[],
        join=join,
        starter=starter,
    )


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


def test_a_command_execs_in_the_placed_child(starter: Starter, tmp_path: Path) -> None:
    """The placed child (which entered its "cgroup" ahead) becomes the command; with the helper,
    the child waiting is the helper (the worker's own child), not a fork of the spawner."""
    procs = tmp_path / "procs"
    procs.write_text("")
    _placed(starter, [str(procs)])
    assert wait_until(lambda: procs.read_text() == "0", 5), "the child wrote its cgroup.procs once placed"
    waiting = sorted(placed_children(_parent(starter)))
    assert len(waiting) == 1, waiting
    cmdline = Path(f"/proc/{waiting[0]}/cmdline").read_bytes().split(b"\0")
    assert (b"--placed" in cmdline) == isinstance(starter, HelperStarter), cmdline
    pid = asyncio.run(_start(starter, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert pid == waiting[0]
    assert _gone(pid)


def test_a_child_that_could_not_enter_its_cgroup_does_not_look_as_if_it_ran(
    starter: Starter, tmp_path: Path
) -> None:
    """Placement failed (the cgroup is gone): the command is FAILED_TO_START naming the limits
    step, not a completed run; the child is reaped."""
    join = [str(tmp_path / "missing" / "cgroup.procs")]
    _placed(starter, join)
    with pytest.raises(SpawnFailure, match="could not apply resource limits") as info:
        asyncio.run(_start(starter, tmp_path, join, ["/bin/true"], ENV))
    assert "entering cgroup" in str(info.value)


def test_an_environment_exec_cannot_take_is_worded_as_for_a_forked_spawn(
    starter: Starter, tmp_path: Path
) -> None:
    """A NUL byte in the environment: 'argv or environment cannot be passed', as without placement."""
    procs = tmp_path / "procs"
    procs.write_text("")
    _placed(starter, [str(procs)])
    with pytest.raises(SpawnFailure, match="argv or environment cannot be passed"):
        asyncio.run(_start(starter, tmp_path, [str(procs)], ["/bin/true"], {**ENV, "A": "x\0y"}))


def test_a_missing_program_is_named_and_its_child_reaped(starter: Starter, tmp_path: Path) -> None:
    """ENOENT names argv[0]; the placed child that reported it is reaped, not left a zombie."""
    procs = tmp_path / "procs"
    procs.write_text("")
    pids_before = set(os.listdir("/proc"))
    _placed(starter, [str(procs)])
    with pytest.raises(SpawnFailure, match="'/bin/not-there'"):
        asyncio.run(_start(starter, tmp_path, [str(procs)], ["/bin/not-there"], ENV))
    zombies = [
        p
        for p in set(os.listdir("/proc")) - pids_before
        if p.isdigit() and _state(p) == "Z" and _parent_of(p) == _parent(starter)
    ]
    assert not zombies


def _state(pid: str) -> str:
    fields = stat_fields(int(pid))
    return fields[STATE].decode() if fields else ""


def _parent_of(pid: str) -> int:
    fields = stat_fields(int(pid))
    return int(fields[PARENT]) if fields else 0


def test_a_spawn_given_up_while_the_spawner_answers_leaves_nothing_running(
    spawner: Spawner, tmp_path: Path
) -> None:
    """Cancelled after its request went out (the client vanished, say): the command the spawner
    started anyway is killed and reaped once the answer comes; no process or zombie is left."""
    procs = tmp_path / "procs"
    procs.write_text("")
    marker = f"sleep-{os.getpid()}-given-up"

    async def main() -> None:
        _placed(spawner, [str(procs)])
        task = asyncio.ensure_future(
            _spawn(spawner, tmp_path, [str(procs)], ["/bin/sh", "-c", f"exec -a {marker} sleep 30"], ENV)
        )
        await asyncio.sleep(0)  # the request is on its way; the answer is not read yet
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # the answer, the kill, the background reap

    asyncio.run(main())
    assert spawner.pid is not None
    left = [p for p in os.listdir("/proc") if p.isdigit() and _parent_of(p) == spawner.pid]
    running = [p for p in left if marker.encode() in _cmdline(p)]
    assert not running, "the command was killed"
    assert not [p for p in left if _state(p) == "Z"], "and reaped"


def _cmdline(pid: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@pytest.mark.parametrize(
    "cwd",
    ["/" + "d" * 9000, "/tmp/not-utf8-\udcff\udcfe"],
    ids=["too-long-to-quote-whole", "not-utf8"],
)
def test_a_working_directory_the_child_cannot_enter_fails_to_start_however_it_is_named(
    starter: Starter, tmp_path: Path, cwd: str
) -> None:
    """A directory name far longer than a path may be, or not UTF-8, still comes back as a failed
    start (a placed child's report is cut or leaves the name out), never as a command that ran."""
    procs = tmp_path / "procs"
    procs.write_text("")
    _placed(starter, [str(procs)])

    async def main() -> None:
        child = await _spawn(starter, Path(cwd), [str(procs)], ["/bin/true"], ENV)
        await started(child, argv0="/bin/true", cwd=Path(cwd), working_directory="")

    with pytest.raises(SpawnFailure):
        asyncio.run(main())


def test_an_answer_to_a_loop_that_has_ended_breaks_nothing_for_the_next(
    spawner: Spawner, tmp_path: Path
) -> None:
    """A spawn cancelled as its event loop ends has its answer come later: the command it started
    is killed, and the spawner serves the next loop as before."""
    procs = tmp_path / "procs"
    procs.write_text("")

    given_up: list[asyncio.Future[object]] = []  # never awaited: asyncio.run cancels it at its end

    async def abandon() -> None:
        _placed(spawner, [str(procs)])
        given_up.append(
            asyncio.ensure_future(_spawn(spawner, tmp_path, [str(procs)], ["/bin/sleep", "30"], ENV))
        )
        await asyncio.sleep(0)  # sent; the loop ends before the answer is read

    asyncio.run(abandon())
    _placed(spawner, [str(procs)])
    pid = asyncio.run(_start(spawner, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert _gone(pid)
    assert spawner.pid is not None
    hung_on = spawner.pid

    def still_running() -> list[str]:
        children = [p for p in os.listdir("/proc") if p.isdigit() and _parent_of(p) == hung_on]
        return [p for p in children if _state(p) not in ("Z", "")]

    # SIGKILL was sent as the answer came; dying takes a moment
    assert wait_until(lambda: not still_running(), 5), "the abandoned command was killed"


def test_a_hung_spawner_is_given_up_after_the_answer_timeout_and_replaced(
    spawner: Spawner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A spawner that stops answering (here: stopped by a signal) fails the waiting request once
    it has been silent for the answer timeout; it is killed, and the next spawn starts a new one."""
    monkeypatch.setattr(spawner_module, "REPLY_TIMEOUT_SECONDS", 0.5)
    hung = spawner.pid
    assert hung is not None

    async def main() -> float:
        os.kill(hung, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(ChildProcessError, match="stopped answering"):
            await spawner.reap_async(os.getpid())
        return time.monotonic() - began

    waited = asyncio.run(main())
    assert 0.4 <= waited < 5, waited
    assert not spawner.alive() and _gone(hung), "the hung spawner was killed"
    procs = tmp_path / "procs"
    procs.write_text("")
    spawner.start()
    _placed(spawner, [str(procs)])
    pid = asyncio.run(_start(spawner, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert _gone(pid) and spawner.pid != hung


def test_the_spawner_is_out_of_the_worker_s_process_group(spawner: Spawner) -> None:
    """A terminal's Ctrl-C goes to the worker's process group: the worker shuts down in order, and
    the spawner, in a session of its own, never sees it (it used to print a traceback)."""
    assert spawner.pid is not None
    assert os.getpgid(spawner.pid) != os.getpgid(0)
    assert os.getsid(spawner.pid) == spawner.pid


# ---- the worker's own starter of native helpers -------------------------------------------------


@pytest.fixture
def helpers() -> Iterator[HelperStarter]:
    made = HelperStarter(bundled_agent())
    try:
        yield made
    finally:
        made.close()


def test_without_a_placed_helper_a_new_one_takes_the_command_at_once(
    helpers: HelperStarter, tmp_path: Path
) -> None:
    """Nothing placed for this cgroup: a helper is started for the command there and then; it
    enters the cgroup before exec, and the command is this process's child, reaped here."""
    procs = tmp_path / "procs"
    procs.write_text("")
    pid = asyncio.run(_start(helpers, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert procs.read_text() == "0"
    assert _gone(pid)


def test_a_placed_helper_killed_from_outside_is_replaced_for_its_command(
    helpers: HelperStarter, tmp_path: Path
) -> None:
    """The helper waiting for this cgroup was killed: the command goes to a new one (not to a dead
    socket), and the dead one is reaped, not left a zombie."""
    procs = tmp_path / "procs"
    procs.write_text("")
    _placed(helpers, [str(procs)])
    (dead,) = placed_children(os.getpid())
    os.kill(dead, signal.SIGKILL)
    assert wait_until(lambda: _state(str(dead)) == "Z", 5)
    pid = asyncio.run(_start(helpers, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert pid != dead and _gone(pid)
    assert _gone(dead), "the killed helper was reaped"


def test_a_command_dies_with_the_thread_that_started_its_helper(tmp_path: Path) -> None:
    """A command's helper has SIGKILL as its parent-death signal, kept across exec: when the
    thread that started it ends (in the worker: the event loop's, with the worker), the command
    ends too, whatever it was doing."""
    procs = tmp_path / "procs"
    procs.write_text("")
    started_pid: list[int] = []

    def loop_thread() -> None:
        starter = HelperStarter(bundled_agent())

        async def run() -> None:
            child = await _spawn(starter, tmp_path, [str(procs)], ["/bin/sleep", "300"], ENV)
            await started(child, argv0="/bin/sleep", cwd=tmp_path, working_directory="")
            started_pid.append(child.pid)
            for fd in (child.stdout_fd, child.stderr_fd, child.pidfd):
                os.close(fd)

        try:
            asyncio.run(run())
        finally:
            starter.close()

    thread = threading.Thread(target=loop_thread)
    thread.start()
    thread.join()
    (pid,) = started_pid
    try:
        assert wait_until(lambda: _state(str(pid)) in ("Z", ""), 5), "the command was killed"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_a_command_whose_helper_is_still_being_placed_waits_for_it(
    helpers: HelperStarter, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command comes while the placer is still starting the helper for its cgroup: it waits
    for that one (no second helper enters the action's cgroup, where it would count against
    the action's process limit), and runs in it."""
    started_helpers: list[int] = []
    start = helper_starter_module._start_helper

    def slow_start(helper: bytes, key: tuple[str, ...], *, resident: bool = False) -> Any:
        if threading.current_thread().name == "helper-placer":
            time.sleep(0.3)
        placed = start(helper, key, resident=resident)
        started_helpers.append(placed.pid)
        return placed

    monkeypatch.setattr(helper_starter_module, "_start_helper", slow_start)
    procs = tmp_path / "procs"
    procs.write_text("")
    helpers.place([[str(procs)]])
    pid = asyncio.run(_start(helpers, tmp_path, [str(procs)], ["/bin/true"], ENV))
    helpers.close()  # the placer has finished whatever it was doing
    assert started_helpers == [pid], "the command ran in the helper placed for it, the only one started"


def test_a_helper_placed_in_cgroups_that_will_not_be_used_is_ended_and_reaped(
    helpers: HelperStarter, tmp_path: Path
) -> None:
    """Its action failed before handing a command over (or its cgroup is being removed, so the
    helper could not even enter it and would wait forever): ``forget`` ends it, and reaps it."""
    join = [str(tmp_path / "removed" / "cgroup.procs")]
    _placed(helpers, join)
    (waiting,) = placed_children(os.getpid())
    helpers.forget(join)
    assert _gone(waiting), "ended and reaped at once"


def test_a_placed_helper_is_in_a_session_of_its_own(helpers: HelperStarter, tmp_path: Path) -> None:
    """A terminal's Ctrl-C (or any signal to the worker's process group) never reaches a helper
    waiting for its command; the command it becomes leads that session and process group."""
    procs = tmp_path / "procs"
    procs.write_text("")
    _placed(helpers, [str(procs)])
    (waiting,) = placed_children(os.getpid())
    assert os.getsid(waiting) == waiting and os.getpgid(waiting) == waiting


def test_a_closed_starter_starts_nothing(helpers: HelperStarter, tmp_path: Path) -> None:
    """After close (the executor is shutting down) a command is refused as unavailable, not run
    in a helper nobody would stop."""
    procs = tmp_path / "procs"
    procs.write_text("")
    helpers.close()
    with pytest.raises(UnavailableError, match="closing"):
        asyncio.run(_start(helpers, tmp_path, [str(procs)], ["/bin/true"], ENV))
    assert procs.read_text() == "", "no helper entered the cgroup"
