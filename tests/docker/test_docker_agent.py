"""The in-container agent on a real engine: exec semantics, hardening, and an agent no action can reach."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import (
    ENV,
    TEST_LIMITS_CONFIG,
    Ran,
    docker_executor,
    labelled_containers,
    new_worker_id,
    pooled,
    remove_labelled,
    run_command,
)

from expbuild_worker.config import DockerPoolConfig
from expbuild_worker.errors import ConfigError, InternalError
from expbuild_worker.execution.decorators import LogLimitingExecutor
from expbuild_worker.execution.docker import DockerExecutor
from expbuild_worker.model import ExecutionStatus

pytestmark = pytest.mark.docker

MiB = 1 << 20

VIA_AGENT = "test -x /.expbuild/expbuild-agent && echo via-agent >&2; "
"""Prefixed to a script: proves the action entered a pool container through the agent (a cold
container, which would give the same results, has no agent)."""


async def ready(ex: DockerExecutor) -> DockerExecutor:
    """The pool filled (a fresh container waits), so the next action enters one."""
    await asyncio.sleep(0.05)
    await ex.warmup([])
    return ex


def test_exec_semantics_environment_directory_stdin_streams_and_exit_code(
    busybox_image: str, tmp_path: Path
) -> None:
    """What the command gets and gives through the agent: the container's environment overlaid
    with the request's, its working directory, stdin, separate byte-exact streams, its exit code."""
    script = VIA_AGENT + (
        "env | sort; pwd; cat > got-stdin; echo to-stderr >&2; "
        "head -c 3000000 /dev/urandom > blob; cat blob; exit 3"
    )

    async def main() -> Ran:
        async with pooled(busybox_image) as ex:
            (tmp_path / "sub").mkdir(parents=True)
            return await run_command(
                await ready(ex),
                tmp_path,
                ["sh", "-c", script],
                env={**ENV, "FROM_REQUEST": "a b=c", "HOME": "/work"},
                workdir="sub",
                stdin=b"input bytes\x00\xff",
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED and ran.outcome.exit_code == 3, ran.outcome
    blob = (tmp_path / "sub" / "blob").read_bytes()
    assert len(blob) == 3000000 and ran.stdout.endswith(blob)
    head = ran.stdout[: -len(blob)].decode().splitlines()
    assert "FROM_REQUEST=a b=c" in head and "PATH=/bin" in head and "HOME=/work" in head
    assert any(line.startswith("HOSTNAME=") for line in head), "the engine's HOSTNAME, as for an exec"
    assert head[-1] == "/work/sub"
    assert ran.stderr == b"via-agent\nto-stderr\n"
    assert (tmp_path / "sub" / "got-stdin").read_bytes() == b"input bytes\x00\xff"


def test_a_command_killed_by_a_signal_reports_it(busybox_image: str, tmp_path: Path) -> None:
    """Killed by its own SIGTERM: exit code 143, as the engine reports it, with the signal named."""

    async def main() -> Ran:
        async with pooled(busybox_image) as ex:
            return await run_command(await ready(ex), tmp_path, ["sh", "-c", VIA_AGENT + "kill -TERM $$"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED and ran.outcome.exit_code == 143
    assert ran.stderr == b"via-agent\n"
    assert "SIGTERM" in ran.outcome.message


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["no-such-program", "x"], "No such file or directory (not found in the command's PATH)"),
        (["./not-executable"], "Permission denied"),
        (["/work"], "Permission denied"),
    ],
    ids=["missing", "not-executable", "directory"],
)
def test_a_program_that_cannot_run_fails_to_start(
    busybox_image: str, tmp_path: Path, argv: list[str], reason: str
) -> None:
    """argv[0] the agent cannot execute is FAILED_TO_START with the reason, not an exit code."""

    async def main() -> tuple[Ran, Ran]:
        async with pooled(busybox_image) as ex:
            tmp_path.mkdir(exist_ok=True)
            (tmp_path / "not-executable").write_text("#!/bin/sh\necho hi\n")
            failed = await run_command(await ready(ex), tmp_path, argv)
            after = await run_command(await ready(ex), tmp_path / "after", ["echo", "ok"])
            return failed, after

    failed, after = asyncio.run(main())
    assert failed.status is ExecutionStatus.FAILED_TO_START, failed.outcome
    assert argv[0] in failed.outcome.message
    assert f"exec: {reason}" in failed.outcome.message  # the agent's words: it ran in a pool container
    assert failed.outcome.exit_code is None
    assert after.status is ExecutionStatus.COMPLETED and after.stdout == b"ok\n"


def test_argv_and_environment_larger_than_one_message_arrive_whole(
    busybox_image: str, tmp_path: Path
) -> None:
    """A request of about 600 KiB (argv and environment) crosses the socket in pieces, intact."""
    args = [f"{i:06d}" + "a" * 94 for i in range(4000)]
    env = {**ENV, **{f"V{i}": "v" * 200 for i in range(1000)}}

    async def main() -> Ran:
        async with pooled(busybox_image) as ex:
            script = VIA_AGENT + 'echo $#; echo "$1"; eval echo "\\${$#}"; env | grep -c "^V[0-9]*="'
            return await run_command(await ready(ex), tmp_path, ["sh", "-c", script, "sh", *args], env=env)

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED, ran.outcome
    assert ran.stdout.decode().split() == ["4000", args[0], args[-1], "1000"]
    assert ran.stderr == b"via-agent\n"


def test_the_agent_cannot_be_reached_signalled_or_read_by_the_command(
    busybox_image: str, tmp_path: Path
) -> None:
    """The socket is gone, the agent's directory is read-only, the agent ignores kill -9 from
    inside and cannot be read through /proc; the command runs with no capabilities, no new
    privileges, as the configured user; and the next action in the recycled container works."""
    probe = (
        "hostname; ls -A /.expbuild/ctl | wc -l; touch /.expbuild/ctl/x 2>/dev/null || echo read-only; "
        "kill -9 1; kill -TERM 1; sleep 0.2; "
        "cat /proc/1/environ >/dev/null 2>&1 || echo environ-denied; "
        "readlink /proc/1/exe >/dev/null 2>&1 || echo exe-denied; "
        "(echo 900 > /proc/1/oom_score_adj) 2>/dev/null || echo oom-score-denied; "
        "grep -E '^(CapEff|NoNewPrivs|Uid)' /proc/self/status"
    )

    async def main() -> tuple[Ran, Ran]:
        async with pooled(busybox_image) as ex:
            first = await run_command(await ready(ex), tmp_path / "a", ["sh", "-c", probe], recycle=True)
            await asyncio.sleep(0.3)  # the clean-up gives the container back after the outcome
            second = await run_command(ex, tmp_path / "b", ["hostname"], recycle=True)
            return first, second

    first, second = asyncio.run(main())
    assert first.status is ExecutionStatus.COMPLETED, first.outcome
    lines = first.stdout.decode().splitlines()
    assert lines[1:6] == ["0", "read-only", "environ-denied", "exe-denied", "oom-score-denied"], lines
    status = {line.split(":")[0]: line.split()[1:] for line in lines[6:]}
    assert status["CapEff"] == ["0000000000000000"] and status["NoNewPrivs"] == ["1"]
    assert status["Uid"][0] == "65534"
    assert second.status is ExecutionStatus.COMPLETED
    assert second.stdout.decode().strip() == lines[0], "the agent survived and the container was reused"


@pytest.mark.parametrize(
    ("change", "what"),
    [
        ("renice -n 10 -p 1", "nice value"),
        ("ionice -c 3 -p 1", "I/O priority"),
        ("taskset -p 1 1", "CPU affinity"),
    ],
    ids=["nice", "ionice", "affinity"],
)
def test_a_command_that_changes_what_the_agent_passes_on_retires_the_container(
    busybox_image: str, tmp_path: Path, caplog: pytest.LogCaptureFixture, change: str, what: str
) -> None:
    """The same user may change some things of the agent that every later command would inherit;
    the check between actions sees it and the next action gets another container, untouched."""
    look = VIA_AGENT + "hostname; cut -d' ' -f19 /proc/self/stat"

    async def main() -> tuple[Ran, Ran]:
        async with pooled(busybox_image) as ex:
            first = await run_command(
                await ready(ex), tmp_path / "a", ["sh", "-c", f"hostname; {change}"], recycle=True
            )
            await asyncio.sleep(0.3)
            second = await run_command(await ready(ex), tmp_path / "b", ["sh", "-c", look], recycle=True)
            return first, second

    first, second = asyncio.run(main())
    assert first.status is ExecutionStatus.COMPLETED and first.outcome.exit_code == 0, first
    host, nice = second.stdout.decode().split()
    assert host != first.stdout.decode().split()[0], "the changed container was not lent again"
    assert nice == "0" and second.stderr == b"via-agent\n"
    assert f"a command changed the agent's {what}" in caplog.text


def test_a_command_ignoring_sigterm_is_killed_after_the_grace(busybox_image: str, tmp_path: Path) -> None:
    """A stop sends SIGTERM through the agent; a command that ignores it gets SIGKILL after the grace."""

    async def main() -> Ran:
        async with pooled(busybox_image, kill_grace_seconds=0.5) as ex:
            stubborn = ["sh", "-c", VIA_AGENT + "trap '' TERM; sleep 600 & wait; sleep 600"]
            return await run_command(await ready(ex), tmp_path, stubborn, stop_after=0.5)

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.TIMED_OUT
    assert "SIGTERM, then SIGKILL" in ran.outcome.message
    assert ran.stderr == b"via-agent\n"
    assert ran.elapsed < 30


def test_a_held_command_blocks_past_the_log_cap(busybox_image: str, tmp_path: Path) -> None:
    """Past the cap the worker stops reading the command's pipe: its writes block until the stop."""
    cap, piece = 1 * MiB, 65536
    writer = VIA_AGENT + (
        f"s=$(head -c {piece} /dev/zero | tr '\\0' x); n=0; "
        "while :; do n=$((n+1)); echo $n > /work/progress.new; mv /work/progress.new /work/progress; "
        'printf %s "$s"; done'
    )

    async def main() -> Ran:
        async with pooled(busybox_image) as ex:
            limited = LogLimitingExecutor(await ready(ex), max_bytes_per_stream=cap)
            return await run_command(limited, tmp_path, ["sh", "-c", writer], stop_after=3)  # type: ignore[arg-type]

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.TIMED_OUT
    assert len(ran.stdout) == cap and ran.stderr == b"via-agent\n"
    written = int((tmp_path / "progress").read_text()) * piece
    assert written <= cap + 8 * MiB, f"{written} bytes written while held"  # read-ahead and a pipe


def test_a_pool_container_killed_while_its_command_runs_is_an_internal_error(
    busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """The agent's connection drops with its container: the action fails with a named error, not a
    made-up exit code, and the container is not lent again."""
    worker_id = new_worker_id()

    async def main() -> tuple[BaseException | None, Ran]:
        async with docker_executor(
            busybox_image,
            worker_id=worker_id,
            pool=DockerPoolConfig(enabled=True, min_idle=1, max_size=2, agent="on"),
            default_limits=TEST_LIMITS_CONFIG,
        ) as ex:
            await ready(ex)
            victim = labelled_containers(docker_client, worker_id)[0]["Id"]
            loop = asyncio.get_running_loop()
            loop.call_later(1.0, lambda: docker_client.api.kill(victim))
            error: BaseException | None = None
            try:
                await run_command(ex, tmp_path / "a", ["sh", "-c", VIA_AGENT + "sleep 30"])
            except InternalError as err:
                error = err
            after = await run_command(await ready(ex), tmp_path / "b", ["sh", "-c", VIA_AGENT + "echo ok"])
            return error, after

    try:
        error, after = asyncio.run(main())
    finally:
        remove_labelled(docker_client, worker_id)
    assert error is not None and "stopped while the command ran" in str(error)
    assert after.status is ExecutionStatus.COMPLETED and after.stdout == b"ok\n"
    assert after.stderr == b"via-agent\n", "a new pool container replaced the killed one"


def test_the_agent_is_reached_however_long_the_pool_directory_s_name(
    busybox_image: str, tmp_path: Path
) -> None:
    """A Unix socket path has at most 107 bytes; the pool's directory is named after the worker
    id and the executor, so the socket is bound through a descriptor of its directory."""
    long_id = "ip-10-0-12-34.eu-west-1.compute.internal." + "w" * 20

    async def main() -> Ran:
        async with docker_executor(
            busybox_image,
            worker_id=long_id,
            pool=DockerPoolConfig(enabled=True, agent="on"),
            default_limits=TEST_LIMITS_CONFIG,
        ) as ex:
            return await run_command(await ready(ex), tmp_path, ["sh", "-c", VIA_AGENT + "echo ok"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED and ran.stdout == b"ok\n"
    assert ran.stderr == b"via-agent\n"


def test_a_required_agent_that_is_missing_is_a_configuration_error(
    busybox_image: str, tmp_path: Path
) -> None:
    """``agent = "on"`` with no binary refuses to start; ``auto`` enters by exec and says so."""
    missing = str(tmp_path / "no-agent")

    async def main() -> dict[str, str]:
        with pytest.raises(ConfigError, match=r"pool\.agent: 'on', but no agent binary at"):
            required = DockerPoolConfig(enabled=True, agent="on", agent_path=missing)
            async with docker_executor(busybox_image, pool=required):
                pass
        async with docker_executor(
            busybox_image, pool=DockerPoolConfig(enabled=True, agent="auto", agent_path=missing)
        ) as ex:
            return dict((await ex.capabilities()).details)

    details = asyncio.run(main())
    assert details["pool"] == "entered by the engine's exec"
