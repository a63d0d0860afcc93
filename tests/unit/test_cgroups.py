"""Per-action cgroups: the layout both executors share, counters, limits, killing and sweeping."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from _support import wait_gone

from expbuild_worker.errors import PreconditionError
from expbuild_worker.execution.cgroups import (
    ActionCgroups,
    Mount,
    favors_dynamic_migrations,
    parse_mountinfo,
    read_mountinfo,
    worker_key,
)

MOUNTINFO = """\
25 30 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
26 25 0:23 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
29 25 0:26 /nested /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
"""

WORKER = "unit-tests"


def _real_cgroups(executor: str) -> ActionCgroups:
    """This machine's cgroups for an owning executor, or a skip saying why they cannot be used."""
    try:
        return ActionCgroups.for_host(
            mountinfo=read_mountinfo(), parent="expbuild", worker_id=WORKER, executor=executor
        )
    except PreconditionError as err:
        pytest.skip(f"this process cannot create cgroups: {err}")


# ---- layout --------------------------------------------------------------------------------------


def test_mountinfo_finds_hierarchies_that_show_their_root() -> None:
    """Controllers are found by mount options; a mount of a nested cgroup (not its root) is ignored."""
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(str(m.path), m.version) for m in mounts] == [
        ("/sys/fs/cgroup/memory", 1),
        ("/sys/fs/cgroup/cpu,cpuacct", 1),
        ("/sys/fs/cgroup/unified", 2),
    ]
    assert "cpuacct" in mounts[1].controllers


def test_favordynmods_is_found_on_any_cgroup_mount_and_nowhere_else() -> None:
    """The option counts on a v1 or v2 hierarchy's super options; not on another file system."""
    assert not favors_dynamic_migrations(MOUNTINFO)
    on_v2 = MOUNTINFO.replace("cgroup2 cgroup2 rw\n", "cgroup2 cgroup2 rw,favordynmods\n")
    assert favors_dynamic_migrations(on_v2)
    on_v1 = MOUNTINFO.replace("cgroup cgroup rw,memory", "cgroup cgroup rw,memory,favordynmods")
    assert favors_dynamic_migrations(on_v1)
    elsewhere = MOUNTINFO.replace("tmpfs tmpfs rw,mode=755", "tmpfs tmpfs rw,mode=755,favordynmods")
    assert not favors_dynamic_migrations(elsewhere)


def test_worker_key_is_a_safe_directory_name() -> None:
    """A plain id is used as is; anything that could escape or clash is hashed."""
    assert worker_key("build-host-1") == "build-host-1"
    assert worker_key("../evil").startswith("w-")
    assert worker_key("a/b") != worker_key("a_b")


# ---- counters of a Docker action's parent cgroup --------------------------------------------------


def test_cgroup_v2_counters_are_read_from_the_action_parent(tmp_path: Path) -> None:
    """On cgroup v2 CPU time, peak memory and the OOM-kill count come from the per-action parent."""
    cgroups = ActionCgroups(
        mounts=[Mount(tmp_path, 2, frozenset())], version=2, parent="expbuild", worker_id="w", executor="d"
    )
    assert cgroups.parent_for("t1") == "/expbuild/w/d/t1"
    action = tmp_path / "expbuild/w/d/t1"
    action.mkdir(parents=True)
    (action / "cpu.stat").write_text("usage_usec 3500000\nuser_usec 3000000\nsystem_usec 500000\n")
    (action / "memory.peak").write_text("104857600\n")
    (action / "memory.events").write_text("low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    reading = cgroups.read("t1")
    assert reading.usage.user_cpu_seconds == 3.0 and reading.usage.system_cpu_seconds == 0.5
    assert reading.usage.peak_memory_bytes == 100 << 20
    assert reading.oom_kills == 1


def _v1_fake(tmp_path: Path, parent: str = "/expbuild/") -> ActionCgroups:
    memory, cpu = tmp_path / "memory", tmp_path / "cpuacct"
    return ActionCgroups(
        mounts=[Mount(memory, 1, frozenset({"memory"})), Mount(cpu, 1, frozenset({"cpuacct"}))],
        version=1,
        parent=parent,
        worker_id="w",
        executor="d",
    )


def _v1_counters(tmp_path: Path, token: str) -> None:
    memory, cpu = tmp_path / "memory/expbuild/w/d" / token, tmp_path / "cpuacct/expbuild/w/d" / token
    memory.mkdir(parents=True, exist_ok=True)
    cpu.mkdir(parents=True, exist_ok=True)
    (memory / "memory.max_usage_in_bytes").write_text("2000000\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (cpu / "cpuacct.usage_user").write_text("1500000000\n")
    (cpu / "cpuacct.usage_sys").write_text("250000000\n")


def test_cgroup_v1_counters_and_no_oom_count(tmp_path: Path) -> None:
    """On cgroup v1 the parent has CPU and peak memory but no OOM count (the container's died with it)."""
    cgroups = _v1_fake(tmp_path)
    _v1_counters(tmp_path, "t1")
    reading = cgroups.read("t1")
    assert reading.usage.peak_memory_bytes == 2_000_000
    assert (reading.usage.user_cpu_seconds, reading.usage.system_cpu_seconds) == (1.5, 0.25)
    assert reading.oom_kills is None


def test_sweep_removes_only_dead_actions(tmp_path: Path) -> None:
    """The sweep removes action cgroups no live action owns (with empty children) and keeps live ones."""
    cgroups = ActionCgroups(
        mounts=[Mount(tmp_path, 2, frozenset())], version=2, parent="expbuild", worker_id="w", executor="d"
    )
    (tmp_path / "expbuild/w/d/live").mkdir(parents=True)
    (tmp_path / "expbuild/w/d/dead/container").mkdir(parents=True)
    (tmp_path / "expbuild/w/other-executor/dead").mkdir(parents=True)
    (tmp_path / "expbuild/other-worker/d/dead").mkdir(parents=True)
    assert cgroups.sweep({"live"}) == 1
    assert sorted(os.listdir(tmp_path / "expbuild/w/d")) == ["live"]
    assert (tmp_path / "expbuild/w/other-executor/dead").is_dir(), "another executor's are not ours"
    assert (tmp_path / "expbuild/other-worker/d/dead").is_dir(), "another worker's are not ours"


# ---- cgroups an executor owns ---------------------------------------------------------------------


def test_an_owned_v1_cgroup_reports_its_own_oom_kills(tmp_path: Path) -> None:
    """The host's own cgroup holds the victims, so its v1 OOM count is real (a parent's would be 0)."""
    cgroups = _v1_fake(tmp_path)
    (tmp_path / "memory/expbuild/w/d").mkdir(parents=True)
    (tmp_path / "cpuacct/expbuild/w/d").mkdir(parents=True)
    leaf = cgroups.create("t1", memory_bytes=None, max_processes=None)
    assert leaf.dirs == (str(tmp_path / "memory/expbuild/w/d/t1"), str(tmp_path / "cpuacct/expbuild/w/d/t1"))
    _v1_counters(tmp_path, "t1")
    reading = leaf.read()
    assert reading.oom_kills == 2
    assert reading.usage.peak_memory_bytes == 2_000_000
    assert reading.usage.user_cpu_seconds == 1.5


def test_host_layout_needs_a_memory_hierarchy() -> None:
    """Without a memory controller mounted there is nothing to count with: PreconditionError, saying so."""
    only_cpu = "27 25 0:24 / /sys/fs/cgroup/cpuacct rw - cgroup cgroup rw,cpuacct\n"
    with pytest.raises(PreconditionError, match="memory controller"):
        ActionCgroups.for_host(mountinfo=only_cpu, parent="expbuild", worker_id="w", executor="h")


def test_v2_without_a_delegated_memory_controller_is_refused(tmp_path: Path) -> None:
    """A v2 hierarchy that does not offer the memory controller cannot limit or count: refused, naming it."""
    mountinfo = f"28 25 0:25 / {tmp_path} rw,relatime - cgroup2 cgroup2 rw\n"
    (tmp_path / "cgroup.controllers").write_text("cpu pids\n")
    with pytest.raises(PreconditionError, match=rf"memory controller is not available in {tmp_path}"):
        ActionCgroups.for_host(mountinfo=mountinfo, parent="expbuild", worker_id="w", executor="h")


def test_uncreatable_cgroup_is_a_precondition_error() -> None:
    """A hierarchy this process cannot write to is reported with the directory and the reason."""
    mountinfo = "26 25 0:23 / /proc/1 rw - cgroup cgroup rw,memory,cpuacct\n"
    with pytest.raises(PreconditionError, match="cannot create cgroup /proc/1/expbuild"):
        ActionCgroups.for_host(mountinfo=mountinfo, parent="expbuild", worker_id="w", executor="h")


def test_real_cgroup_gets_its_limits_and_is_removed() -> None:
    """Limits land in the kernel's files (swap included where it can), and removal leaves no directory."""
    cgroups = _real_cgroups("cgroup-unit")
    leaf = cgroups.create(f"{os.getpid()}-limits", memory_bytes=64 << 20, max_processes=32)
    try:
        memory = Path(leaf.dirs[0])
        if cgroups.version == 1:
            assert int((memory / "memory.limit_in_bytes").read_text()) == 64 << 20
            if cgroups.limits_swap:
                assert int((memory / "memory.memsw.limit_in_bytes").read_text()) == 64 << 20
            if cgroups.enforces_processes:
                assert (Path(leaf.dirs[-1]) / "pids.max").read_text().strip() == "32"
        else:
            assert int((memory / "memory.max").read_text()) == 64 << 20
    finally:
        assert leaf.remove()
    assert not any(Path(d).exists() for d in leaf.dirs)
    cgroups.remove_base()


def test_kill_finds_processes_that_left_the_session_and_remove_waits_for_them() -> None:
    """A setsid'd process in the cgroup is SIGKILLed; the cgroup is removable only once it has exited."""
    cgroups = _real_cgroups("cgroup-unit")
    leaf = cgroups.create(f"{os.getpid()}-kill", memory_bytes=None, max_processes=None)
    escapee = subprocess.Popen(["/usr/bin/setsid", "/bin/sleep", "600"])
    try:
        leaf.attach(escapee.pid)
        assert not leaf.remove(), "a cgroup with a process in it cannot be removed"
        leaf.kill()
        escapee.wait(timeout=5)
        deadline = time.monotonic() + 5
        while not leaf.remove():
            assert time.monotonic() < deadline, "the cgroup never became removable"
            time.sleep(0.01)
    finally:
        escapee.kill()
        escapee.wait()
        leaf.kill()
        leaf.remove()
    assert escapee.returncode == -9
    cgroups.remove_base()


def test_stale_lists_only_cgroups_whose_owner_is_gone() -> None:
    """A previous run's action cgroups are stale; a live worker's (this process) are not."""
    cgroups = _real_cgroups("cgroup-unit")
    dead = subprocess.Popen(["/bin/true"])
    dead.wait()
    mine = cgroups.create(f"{os.getpid()}-live", memory_bytes=None, max_processes=None)
    theirs = cgroups.create(f"{dead.pid}-1", memory_bytes=None, max_processes=None)
    sleeper = subprocess.Popen(["/bin/sleep", "600"])
    try:
        theirs.attach(sleeper.pid)

        def owner_alive(token: str) -> bool:
            return token.startswith(f"{os.getpid()}-")

        stale = cgroups.stale(owner_alive)
        assert [leaf.token for leaf in stale] == [theirs.token]
        stale[0].kill()
        assert wait_gone(sleeper.pid)
    finally:
        sleeper.kill()
        sleeper.wait()
        for leaf in (mine, theirs):
            deadline = time.monotonic() + 5
            while not leaf.remove() and time.monotonic() < deadline:
                time.sleep(0.01)
    cgroups.remove_base()
