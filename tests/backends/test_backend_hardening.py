"""The Docker tests' hardening checks, run against every other backend that claims them:
the bubblewrap sandbox, the Docker executor on Podman, and the Docker executor on gVisor."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Backend

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))

from _dockerkit import Ran, run_command

from expbuild_worker.model import ExecutionStatus, IsolationLevel, ResourceLimit, ResourceLimits

MiB = 1 << 20
ENV = {"PATH": "/usr/bin:/bin"}
LIMITS = ResourceLimits(memory_bytes=256 * MiB, max_processes=256)
FORK_REFUSED = re.compile(rb"can't fork|Cannot fork|Resource temporarily unavailable")
EXPECTED_ISOLATION = {
    "sandbox": IsolationLevel.NAMESPACE_SANDBOX,
    "podman": IsolationLevel.CONTAINER,
    "gvisor": IsolationLevel.VIRTUALIZED,
}


def run(backend: Backend, root: Path, argv: list[str], **kwargs: Any) -> Ran:
    """Run one command on a fresh executor of ``backend``, removing whatever a failure left."""

    async def main() -> Ran:
        async with backend.executor() as ex:
            try:
                return await run_command(
                    ex, root, argv, env=ENV, limits=kwargs.pop("limits", LIMITS), **kwargs
                )
            finally:
                backend.cleanup(ex)

    return asyncio.run(main())


def test_capabilities_report_the_isolation_level_and_what_is_enforced(backend: Backend) -> None:
    """Selection by isolation relies on each backend's level: sandbox < container < virtualized."""

    async def main() -> Any:
        async with backend.executor() as ex:
            return ex.isolation, await ex.capabilities()

    isolation, caps = asyncio.run(main())
    assert isolation is EXPECTED_ISOLATION[backend.name] and caps.isolation is isolation
    assert caps.readiness.ready, caps.readiness.message
    assert {ResourceLimit.MEMORY, ResourceLimit.NETWORK, ResourceLimit.TIMEOUT} <= caps.enforced_limits


def test_no_capabilities_no_new_privileges_and_not_root(backend: Backend, tmp_path: Path) -> None:
    """A command that cannot gain privileges or act as root is what every isolating backend promises."""
    ran = run(backend, tmp_path, ["sh", "-c", "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; id -u"])
    assert ran.status is ExecutionStatus.COMPLETED, (ran.outcome, ran.stderr)
    lines = ran.stdout.decode().split("\n")
    assert "CapEff:\t0000000000000000" in lines
    if backend.name == "gvisor":  # gVisor's own /proc has no NoNewPrivs line; the flag is on its Sentry
        assert not any(line.startswith("NoNewPrivs:") for line in lines)
    else:
        assert "NoNewPrivs:\t1" in lines
    assert lines[-2] != "0", "the command must not run as root"


def test_only_loopback_exists_and_the_host_is_unreachable(backend: Backend, tmp_path: Path) -> None:
    """Without network access only `lo` exists, and a port open on the host's loopback is unreachable."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    script = (
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
        f"if busybox nc -w 2 127.0.0.1 {port} </dev/null; then echo connected; else echo refused; fi"
    )
    try:
        ran = run(backend, tmp_path, ["sh", "-c", script])
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert ran.status is ExecutionStatus.COMPLETED, (ran.outcome, ran.stderr)
    assert ran.stdout.split() == [b"lo", b"refused"]


def test_root_is_read_only_while_tmp_and_the_work_directory_are_writable(
    backend: Backend, tmp_path: Path
) -> None:
    """A step cannot alter the toolchain for the next one, yet scripts in /tmp run and outputs land."""
    script = (
        "touch /usr/probe 2>/dev/null && echo usr-written || echo usr-refused; "
        "touch /probe 2>/dev/null && echo root-written || echo root-refused; "
        "printf '#!/bin/sh\\necho script ran\\n' > /tmp/s.sh && chmod +x /tmp/s.sh && /tmp/s.sh; "
        "echo output > out.txt"
    )
    ran = run(backend, tmp_path, ["sh", "-c", script], outputs=["out.txt"])
    assert ran.status is ExecutionStatus.COMPLETED, (ran.outcome, ran.stderr)
    assert ran.stdout.split(b"\n")[:3] == [b"usr-refused", b"root-refused", b"script ran"]
    assert (tmp_path / "out.txt").read_bytes() == b"output\n"


def test_memory_hog_is_oom_killed(backend: Backend, tmp_path: Path) -> None:
    """A 300 MB allocation under a 64 MB limit ends OOM_KILLED, not as a plain exit — on Podman
    too, whose State.OOMKilled stays false on cgroup v1 (the worker watches the action's cgroup)."""
    ran = run(
        backend,
        tmp_path,
        ["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
        limits=ResourceLimits(memory_bytes=64 * MiB, max_processes=64),
    )
    assert ran.status is ExecutionStatus.OOM_KILLED, (ran.outcome, ran.stderr)


def _assert_processes_reported_unenforced(backend: Backend) -> None:
    """gVisor: a command's processes are not host processes there. pids.max bounds the runtime's
    own threads, and a burst of forks ended the whole sandbox (exit 2, output lost) instead of
    failing fork() in the command. So the limit must be listed as not enforced."""

    async def caps() -> Any:
        async with backend.executor() as ex:
            return await ex.capabilities()

    reported = asyncio.run(caps())
    assert ResourceLimit.PROCESSES in reported.unenforced_limits
    assert ResourceLimit.PROCESSES not in reported.enforced_limits


def test_process_limit_refuses_forks(backend: Backend, tmp_path: Path) -> None:
    """Forks past the process limit fail in the command, so a fork bomb cannot take the machine;
    a backend that cannot promise that (gVisor) says so in its capabilities instead."""
    if backend.name == "gvisor":
        _assert_processes_reported_unenforced(backend)
        return
    script = "i=0; while [ $i -lt 80 ]; do sleep 30 & i=$((i+1)); done; kill $(jobs -p) 2>/dev/null; exit 0"
    ran = run(
        backend,
        tmp_path,
        ["sh", "-c", script],
        limits=ResourceLimits(memory_bytes=256 * MiB, max_processes=20),
    )
    assert FORK_REFUSED.search(ran.stderr), (ran.outcome, ran.stderr[-500:])


def test_the_process_limit_is_the_command_s_own_exactly(backend: Backend, tmp_path: Path) -> None:
    """max_processes=3 gives the command three processes: the shell and two background sleeps
    (busy box sh exits at the first refused fork); the runtime's init and room are not its."""
    if backend.name == "gvisor":
        _assert_processes_reported_unenforced(backend)
        return
    script = "sleep 0.5; for i in 1 2 3 4; do sleep 2 & echo started $i; done; wait"
    ran = run(
        backend, tmp_path, ["sh", "-c", script], limits=ResourceLimits(memory_bytes=64 * MiB, max_processes=3)
    )
    assert ran.stdout == b"started 1\nstarted 2\n", (ran.outcome, ran.stdout, ran.stderr[-300:])


def test_sleep_past_its_deadline_is_timed_out_and_nothing_is_left(backend: Backend, tmp_path: Path) -> None:
    """`sleep 600` stopped after 1 s ends TIMED_OUT, and no process or container of it remains."""

    async def main() -> tuple[Ran, bool]:
        async with backend.executor() as ex:
            try:
                ran = await run_command(
                    ex,
                    tmp_path,
                    ["sh", "-c", "sleep 600; : expbuild-marker"],
                    env=ENV,
                    limits=LIMITS,
                    stop_after=1.0,
                )
                return ran, await asyncio.to_thread(backend.leftovers, ex)
            finally:
                backend.cleanup(ex)

    ran, clean = asyncio.run(main())
    assert ran.status is ExecutionStatus.TIMED_OUT, ran.outcome
    assert clean, "nothing of a stopped action may remain"
