"""The Docker executor's contract on a real daemon: logs, statuses, stats, images, stopping and removal."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from _dockerkit import (
    ENV,
    TEST_LIMITS,
    docker_executor,
    gone_within,
    labelled_containers,
    remove_labelled,
    run_command,
)

from expbuild_worker.errors import PreconditionError
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.model import (
    ExecutionStatus,
    IsolationLevel,
    LogChunk,
    LogStream,
    ResourceLimits,
    RunOutcome,
    Started,
)

pytestmark = pytest.mark.docker

MiB = 1 << 20


@pytest.mark.parametrize("code", [0, 1, 255], ids=["zero", "one", "max"])
def test_exit_code_is_a_result(busybox_image: str, tmp_path: Path, code: int) -> None:
    """Any exit code, zero or not, is COMPLETED with that code: a failing build step is data, not an error."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", f"exit {code}"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED
    assert ran.outcome.exit_code == code


def test_stdout_and_stderr_stay_apart_and_byte_exact(busybox_image: str, tmp_path: Path) -> None:
    """Binary bytes and a missing trailing newline arrive exactly as written, on the right stream."""
    script = r"printf 'out\000\377\nno-newline'; printf 'err\001' >&2"

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", script])

    ran = asyncio.run(main())
    assert ran.stdout == b"out\x00\xff\nno-newline"
    assert ran.stderr == b"err\x01"
    assert isinstance(ran.events[0], Started)


def test_fifty_megabytes_of_stdout_stream_byte_exact(busybox_image: str, tmp_path: Path) -> None:
    """50 MB of random stdout arrives intact: the sha256 the container computed matches what we got."""
    script = "head -c 52428800 /dev/urandom > /tmp/blob; sha256sum /tmp/blob >&2; cat /tmp/blob"

    async def main() -> tuple[int, str, bytes, ExecutionStatus]:
        # Hashed as it streams, not kept: the test process stays small.
        digest, size, stderr = hashlib.sha256(), 0, bytearray()
        status = ExecutionStatus.INTERNAL
        async with docker_executor(busybox_image) as ex:
            command = Command(
                execution_id="fifty",
                argv=["sh", "-c", script],
                environment=ENV,
                root=tmp_path,
                working_directory="",
                stdin=b"",
                limits=ResourceLimits(cpu_cores=1.0, memory_bytes=512 * MiB, max_processes=64),
            )
            async for event in ex.execute(command, StopSignal()):
                if isinstance(event, LogChunk) and event.stream is LogStream.STDOUT:
                    assert event.offset == size
                    digest.update(event.data)
                    size += len(event.data)
                elif isinstance(event, LogChunk):
                    stderr += event.data
                elif isinstance(event, RunOutcome):
                    status = event.status
        return size, digest.hexdigest(), bytes(stderr), status

    size, sha256, stderr, status = asyncio.run(main())
    assert status is ExecutionStatus.COMPLETED, stderr
    assert size == 50 * MiB
    assert sha256 == stderr.split()[0].decode()


def test_logs_stream_while_the_command_runs(busybox_image: str, tmp_path: Path) -> None:
    """The first chunk reaches the consumer before the command ends (print, sleep 2 s, print)."""

    async def main() -> tuple[float, float]:
        async with docker_executor(busybox_image) as ex:
            command = Command(
                execution_id="live",
                argv=["sh", "-c", "echo first; sleep 2; echo second"],
                environment=ENV,
                root=tmp_path,
                working_directory="",
                stdin=b"",
                limits=TEST_LIMITS,
            )
            first_at = end_at = 0.0
            async for event in ex.execute(command, StopSignal()):
                if isinstance(event, LogChunk) and not first_at:
                    first_at = time.monotonic()
                end_at = time.monotonic()
            return first_at, end_at

    first_at, end_at = asyncio.run(main())
    assert 0 < first_at < end_at - 1.0


def test_stdin_reaches_the_command(busybox_image: str, tmp_path: Path) -> None:
    """Bytes given as stdin are what the command reads, and stdin then ends."""
    data = bytes(range(256)) * 1000

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", "cat; echo done >&2"], stdin=data)

    ran = asyncio.run(main())
    assert ran.stdout == data
    assert ran.stderr == b"done\n"


def test_missing_program_fails_to_start(busybox_image: str, tmp_path: Path) -> None:
    """argv[0] that does not exist in the image is FAILED_TO_START, with the reason, not an exit code 127."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["no-such-program", "x"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.FAILED_TO_START
    assert "no-such-program" in ran.outcome.message
    assert ran.outcome.exit_code is None


def test_a_command_printing_the_init_s_failure_line_is_still_its_own_exit(
    busybox_image: str, tmp_path: Path
) -> None:
    """Only the init's report about argv[0] itself means "failed to start"; a build step that
    prints such a line (running another tini, say) and exits 127 completed with exit code 127."""
    script = "echo '[FATAL tini (7)] exec gcc failed: No such file or directory' >&2; exit 127"

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["sh", "-c", script])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED and ran.outcome.exit_code == 127


def test_missing_program_fails_to_start_without_an_init(busybox_image: str, tmp_path: Path) -> None:
    """Without the init process the daemon refuses the start itself; that too is FAILED_TO_START."""

    async def main() -> Any:
        async with docker_executor(busybox_image, init=False) as ex:
            return await run_command(ex, tmp_path, ["no-such-program"])

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.FAILED_TO_START
    assert "no-such-program" in ran.outcome.message


def test_peak_memory_of_a_100_mb_allocation(busybox_image: str, tmp_path: Path) -> None:
    """A 100 MB allocation reports a peak of at least 100 MB, read after the container is gone."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(
                ex, tmp_path, ["dd", "if=/dev/zero", "of=/dev/null", "bs=100M", "count=1"]
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.COMPLETED
    peak = ran.outcome.usage.peak_memory_bytes
    assert peak is not None and 100 * MiB <= peak < 256 * MiB


def test_cpu_bound_work_reports_plausible_cpu_time(busybox_image: str, tmp_path: Path) -> None:
    """Two seconds of busy loop on one core report CPU time that is substantial yet within wall time."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            return await run_command(ex, tmp_path, ["timeout", "2", "sh", "-c", "while :; do :; done"])

    ran = asyncio.run(main())
    usage = ran.outcome.usage
    assert usage.user_cpu_seconds is not None and usage.system_cpu_seconds is not None
    cpu = usage.user_cpu_seconds + usage.system_cpu_seconds
    assert ran.outcome.started_at is not None and ran.outcome.ended_at is not None
    wall = ran.outcome.ended_at - ran.outcome.started_at
    assert 0.3 <= cpu <= wall * (TEST_LIMITS.cpu_cores or 1) + 0.5
    assert usage.user_cpu_seconds > usage.system_cpu_seconds


def test_ten_concurrent_actions(busybox_image: str, tmp_path: Path, docker_client: Any) -> None:
    """Ten containers at once each produce their own output and exit code, and all are removed."""

    async def main() -> Any:
        async with docker_executor(busybox_image) as ex:
            runs = await asyncio.gather(
                *(
                    run_command(
                        ex, tmp_path / str(i), ["sh", "-c", f"sleep 1; echo action-{i}; exit {i}"], env=ENV
                    )
                    for i in range(10)
                )
            )
            return ex.worker_id, runs

    worker_id, runs = asyncio.run(main())
    try:
        for i, ran in enumerate(runs):
            assert ran.status is ExecutionStatus.COMPLETED
            assert (ran.stdout, ran.outcome.exit_code) == (f"action-{i}\n".encode(), i)
        assert gone_within(docker_client, worker_id)
    finally:
        remove_labelled(docker_client, worker_id)


def test_cancellation_is_reported_as_cancelled(busybox_image: str, tmp_path: Path) -> None:
    """A stop with CANCELLED kills the container and the outcome says CANCELLED, not TIMED_OUT."""

    async def main() -> Any:
        async with docker_executor(busybox_image, kill_grace_seconds=0.2) as ex:
            return await run_command(
                ex,
                tmp_path,
                ["sh", "-c", "trap '' TERM; sleep 600"],
                stop_after=0.5,
                stop_reason=ExecutionStatus.CANCELLED,
            )

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.CANCELLED
    assert "SIGKILL" in ran.outcome.message


def test_closing_the_stream_early_removes_the_container_at_once(
    busybox_image: str, tmp_path: Path, docker_client: Any
) -> None:
    """A consumer that walks away mid-action (aclose) finds the container already gone when aclose returns."""

    async def main() -> tuple[str, list[Any], list[Any]]:
        async with docker_executor(busybox_image) as ex:
            command = Command(
                execution_id="walk-away",
                argv=["sleep", "600"],
                environment=ENV,
                root=tmp_path,
                working_directory="",
                stdin=b"",
                limits=TEST_LIMITS,
            )
            events = ex.execute(command, StopSignal())
            first = await anext(events)
            assert isinstance(first, Started)
            during = labelled_containers(docker_client, ex.worker_id)
            await events.aclose()
            return ex.worker_id, during, labelled_containers(docker_client, ex.worker_id)

    worker_id, during, after = asyncio.run(main())
    try:
        assert len(during) == 1
        assert after == []
    finally:
        remove_labelled(docker_client, worker_id)


def test_close_removes_running_containers(busybox_image: str, tmp_path: Path, docker_client: Any) -> None:
    """Closing the executor while an action runs ends it CANCELLED and leaves no container."""

    async def main() -> tuple[str, Any]:
        async with docker_executor(busybox_image) as ex:
            task = asyncio.ensure_future(run_command(ex, tmp_path, ["sleep", "600"]))
            while not labelled_containers(docker_client, ex.worker_id):
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            await ex.close()
            return ex.worker_id, await task

    worker_id, ran = asyncio.run(main())
    try:
        assert ran.status is ExecutionStatus.CANCELLED
        assert labelled_containers(docker_client, worker_id) == []
    finally:
        remove_labelled(docker_client, worker_id)


def test_missing_image_with_pull_policy_never_is_a_precondition(busybox_image: str, tmp_path: Path) -> None:
    """An image that is not present under `never` is refused, and the error names the image."""
    missing = "expbuild-test/not-there:1"

    async def main() -> None:
        async with docker_executor(missing, pull_policy="never") as ex:
            await run_command(ex, tmp_path, ["true"])

    with pytest.raises(PreconditionError, match="expbuild-test/not-there:1"):
        asyncio.run(main())


def test_failed_pull_is_a_precondition(busybox_image: str, tmp_path: Path) -> None:
    """An image that cannot be pulled under `if-not-present` is refused, naming the image."""
    missing = "expbuild-test/never-published:1"

    async def main() -> None:
        async with docker_executor(missing, pull_policy="if-not-present") as ex:
            await run_command(ex, tmp_path, ["true"])

    with pytest.raises(PreconditionError, match="expbuild-test/never-published:1"):
        asyncio.run(main())


def test_pull_policy_always_pulls_before_every_action(busybox_image: str, tmp_path: Path) -> None:
    """`always` pulls even a present image first; an image no registry has fails the action by name."""

    async def main() -> None:
        async with docker_executor(busybox_image, pull_policy="always") as ex:
            await run_command(ex, tmp_path, ["true"])

    with pytest.raises(PreconditionError, match=f"{busybox_image}.*could not be pulled"):
        asyncio.run(main())


def test_per_request_image_must_be_allowed(busybox_image: str, nonroot_image: str, tmp_path: Path) -> None:
    """A request may pick an image on the allowlist; any other image is refused by name."""

    async def main() -> tuple[Any, str]:
        async with docker_executor(busybox_image, allowed_images=("expbuild-test/busybox-*",), user="") as ex:
            allowed = await run_command(ex, tmp_path / "a", ["id", "-un"], image=nonroot_image)
            try:
                await run_command(ex, tmp_path / "b", ["true"], image="expbuild-test/other:1")
            except PreconditionError as err:
                return allowed, str(err)
            raise AssertionError("an image off the allowlist ran")

    allowed, refusal = asyncio.run(main())
    assert allowed.stdout == b"builder\n"
    assert "expbuild-test/other:1" in refusal


def test_capabilities_report_live_daemon_facts(busybox_image: str) -> None:
    """Capabilities come from the daemon itself: version, runtimes, cgroup version, limits, images present."""

    async def main() -> Any:
        async with docker_executor(busybox_image, warmup_images=("expbuild-test/not-there:1",)) as ex:
            return await ex.capabilities()

    caps = asyncio.run(main())
    assert caps.isolation is IsolationLevel.CONTAINER
    assert caps.readiness.ready
    assert caps.details["engine_version"]
    assert "runc" in caps.details["runtimes"].split(",")
    assert caps.details["cgroup_version"] in ("1", "2")
    assert caps.details["memory_limit_supported"] == "true"
    assert caps.images_present == (busybox_image,)
    assert caps.default_limits.memory_bytes == 2 << 30


def test_readiness_and_warmup_with_a_missing_image(busybox_image: str) -> None:
    """Under `never` a missing configured image makes the executor not ready, and warm-up says why."""

    async def main() -> Any:
        async with docker_executor("expbuild-test/not-there:1", pull_policy="never") as ex:
            return await ex.readiness(), await ex.warmup([busybox_image])

    readiness, report = asyncio.run(main())
    assert not readiness.ready and "expbuild-test/not-there:1" in readiness.message
    assert not report.ready and "expbuild-test/not-there:1" in report.message
    assert busybox_image not in report.images_present, "an image off the allowlist is not warmed"


def test_unknown_runtime_is_not_ready(busybox_image: str) -> None:
    """A configured runtime the daemon lacks makes the executor report itself not ready, naming it."""

    async def main() -> Any:
        async with docker_executor(busybox_image, runtime="runsc-not-registered") as ex:
            return ex.isolation, await ex.readiness()

    isolation, readiness = asyncio.run(main())
    assert isolation is IsolationLevel.VIRTUALIZED
    assert not readiness.ready and "runsc-not-registered" in readiness.message
