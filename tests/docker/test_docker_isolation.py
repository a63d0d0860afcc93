"""The container holds: memory, processes, network, filesystem, privileges — proven on a real daemon."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import ENV, docker_executor, gone_within, remove_labelled, run_command

from expbuild_worker.errors import PreconditionError
from expbuild_worker.model import ExecutionStatus, ResourceLimits

pytestmark = pytest.mark.docker

MiB = 1 << 20


def test_memory_hog_is_oom_killed(busybox_image: str, tmp_path: Path) -> None:
    """A 300 MB allocation under a 64 MB limit (swap included) ends OOM_KILLED, not as a plain exit."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex,
                tmp_path,
                ["dd", "if=/dev/zero", "of=/dev/null", "bs=300M", "count=1"],
                limits=ResourceLimits(cpu_cores=1.0, memory_bytes=64 * MiB, max_processes=64),
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.OOM_KILLED, ran.outcome
    assert "memory" in ran.outcome.message


def test_oom_kill_of_a_child_still_reports_oom(busybox_image: str, tmp_path: Path) -> None:
    """A shell that survives its OOM-killed child and exits 0 is still reported OOM_KILLED."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex,
                tmp_path,
                ["sh", "-c", "dd if=/dev/zero of=/dev/null bs=300M count=1; exit 0"],
                limits=ResourceLimits(cpu_cores=1.0, memory_bytes=64 * MiB, max_processes=64),
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.OOM_KILLED


def test_fork_bomb_is_contained_and_the_worker_stays_healthy(
    busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """A fork bomb hits the PIDs limit, is stopped at its deadline, leaves nothing; the next action runs."""
    bomb = "b() { b | b & }; b; while :; do :; done"

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            bombed = await run_command(
                ex,
                tmp_path / "bomb",
                ["sh", "-c", bomb],
                limits=ResourceLimits(cpu_cores=0.5, memory_bytes=128 * MiB, max_processes=48),
                stop_after=3.0,
            )
            after = await run_command(ex, tmp_path / "after", ["echo", "still fine"])
            return ex.worker_id, bombed, after

    worker_id, bombed, after = asyncio.run(main())
    try:
        assert bombed.status is ExecutionStatus.TIMED_OUT
        assert b"can't fork" in bombed.stderr, "the PIDs limit refused forks"
        assert after.status is ExecutionStatus.COMPLETED and after.stdout == b"still fine\n"
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)


# After a pause (the exact limit is set once the command runs), the shell holds one process and
# forks background sleeps until the limit refuses (busybox sh then exits 2): with 3 allowed,
# two sleeps start.
COUNT_FORKS = "sleep 0.5; for i in 1 2 3 4; do sleep 2 & echo started $i; done; wait"


def test_the_process_limit_is_exact_once_the_command_runs(busybox_image: str, tmp_path: Path) -> None:
    """max_processes=3 lets the command have exactly 3 processes: neither the container's init nor
    the room the runtime's own init needs at start-up is left to the command."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex,
                tmp_path,
                ["sh", "-c", COUNT_FORKS],
                limits=ResourceLimits(memory_bytes=64 * MiB, max_processes=3),
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED, ran
    assert ran.stdout == b"started 1\nstarted 2\n" and b"can't fork" in ran.stderr, (ran.stdout, ran.stderr)


def test_a_process_limit_of_one_starts_reliably(busybox_image: str, tmp_path: Path) -> None:
    """A limit of one process (the runtime's init needs threads of its own to start) runs each time."""

    async def main() -> list[Any]:
        async with docker_executor(busybox_image) as ex:
            limits = ResourceLimits(memory_bytes=64 * MiB, max_processes=1)
            return list(
                await asyncio.gather(
                    *(run_command(ex, tmp_path / str(i), ["echo", "alone"], limits=limits) for i in range(12))
                )
            )

    for ran in asyncio.run(main()):
        assert ran.status is ExecutionStatus.COMPLETED and ran.stdout == b"alone\n", ran


def test_sleep_past_its_deadline_is_timed_out_and_removed(
    busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """`sleep 600` with a 1 s deadline ends TIMED_OUT within seconds and its container is gone."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            ran = await run_command(ex, tmp_path, ["sleep", "600"], stop_after=1.0)
            return ex.worker_id, ran

    worker_id, ran = asyncio.run(main())
    try:
        assert ran.status is ExecutionStatus.TIMED_OUT
        assert ran.elapsed < 15
        assert "SIGTERM" in ran.outcome.message
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)


def test_only_loopback_exists_and_the_host_is_unreachable(busybox_image: str, tmp_path: Path) -> None:
    """With network "none" there is only `lo`, and a port open on the host's loopback is unreachable."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    probe = f"nc -w 2 127.0.0.1 {port} </dev/null"
    script = f"ls /sys/class/net; if {probe}; then echo connected; else echo refused; fi"

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", script])

    try:
        ran = asyncio.run(main())
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
    assert ran.status is ExecutionStatus.COMPLETED
    assert ran.stdout.split() == [b"lo", b"refused"]


def test_network_request_without_a_configured_mode_is_refused(busybox_image: str, tmp_path: Path) -> None:
    """Asking for network where none may be granted fails up front, naming limits.network."""

    async def main() -> None:
        async with docker_executor(busybox_image) as ex:
            limits = ResourceLimits(cpu_cores=1.0, memory_bytes=64 * MiB, max_processes=64, network=True)
            await run_command(ex, tmp_path, ["true"], limits=limits)

    with pytest.raises(PreconditionError, match=r"limits\.network"):
        asyncio.run(main())


def test_root_filesystem_is_read_only_while_tmp_and_workdir_are_writable(
    busybox_image: str, tmp_path: Path
) -> None:
    """`/` refuses writes; /tmp (mounted exec) runs a script; the work directory takes outputs."""
    script = (
        "if touch /rootfile 2>/dev/null; then echo root-writable; else echo root-readonly; fi; "
        "printf '#!/bin/sh\\necho script-ran\\n' > /tmp/s.sh && chmod +x /tmp/s.sh && /tmp/s.sh; "
        "echo made > made.txt && echo work-writable"
    )

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", script])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED, ran.stderr
    assert ran.stdout.split() == [b"root-readonly", b"script-ran", b"work-writable"]
    assert (tmp_path / "made.txt").read_bytes() == b"made\n"


def test_no_capabilities_no_new_privileges_and_not_root(busybox_image: str, tmp_path: Path) -> None:
    """The command runs with no effective capabilities, no_new_privs set and a non-zero uid."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex, tmp_path, ["sh", "-c", "grep -E '^(CapEff|NoNewPrivs):' /proc/self/status; id -u"]
            )

    ran = asyncio.run(main())
    fields = dict(line.split(":", 1) for line in ran.stdout.decode().splitlines() if ":" in line)
    assert int(fields["CapEff"].strip(), 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    assert int(ran.stdout.decode().splitlines()[-1]) != 0


def test_named_non_root_user_of_the_image_can_write_the_workdir(nonroot_image: str, tmp_path: Path) -> None:
    """With user = "" the image's own non-root user runs the command and can still create outputs."""
    (tmp_path / "sub").mkdir(parents=True)

    async def main() -> Any:
        async with docker_executor(nonroot_image, user="") as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", "id -un; echo out > sub/out.txt"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED, ran.stderr
    assert ran.stdout == b"builder\n"
    assert (tmp_path / "sub" / "out.txt").read_bytes() == b"out\n"


def test_inputs_cannot_be_rewritten_in_place(busybox_image: str, tmp_path: Path) -> None:
    """Staged input files stay the worker's: the command reads them but cannot write through them."""
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "input.txt").write_bytes(b"original\n")

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex, tmp_path, ["sh", "-c", "cat input.txt; echo tampered >> input.txt || echo refused"]
            )

    ran = asyncio.run(main())
    assert ran.stdout == b"original\nrefused\n"
    assert (tmp_path / "input.txt").read_bytes() == b"original\n"


def test_environment_is_exactly_the_actions(busybox_image: str, tmp_path: Path) -> None:
    """Only the action's variables (plus the daemon's PATH/HOSTNAME/HOME) reach the command."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["env"], env={**ENV, "GREETING": "hello world"})

    ran = asyncio.run(main())
    names = {line.split("=", 1)[0] for line in ran.stdout.decode().splitlines()}
    assert "GREETING=hello world" in ran.stdout.decode().splitlines()
    assert names <= {"GREETING", "PATH", "HOSTNAME", "HOME", "PWD", "SHLVL"}
