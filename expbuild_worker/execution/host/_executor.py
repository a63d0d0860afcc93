"""HostExecutor: runs a command as a plain process in its own process group and cgroup, with no isolation."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from expbuild_worker.config import CgroupMode
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.process import Launch, ProcessRunner, resolve_executable
from expbuild_worker.model import (
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    WarmupReport,
)


class _PlainLaunch:
    """The host's launcher: argv as it is, argv[0] looked up on the command's own PATH."""

    own_processes = 0

    def unenforceable(self, limits: ResourceLimits) -> str:
        if limits.cpu_cores is not None:
            return f"cpu_cores={limits.cpu_cores:g} (a plain process shares every host CPU)"
        if limits.network is False:
            return "network=NETWORK_ACCESS_DISABLED (a plain process always has the host's network)"
        return ""

    def unavailable(self, limits: ResourceLimits) -> str:
        return ""

    def launch(self, command: Command, cwd: Path) -> Launch:
        executable = resolve_executable(command.argv[0] if command.argv else "", command.environment, cwd)
        return Launch(argv=command.argv, executable=executable, cwd=cwd)


class HostExecutor:
    """Runs each command as a plain child process of the worker: fast, and no isolation at all.

    Everything about the process (its own environment, session and process group, its
    cgroup with usage, memory and process limits, the unprivileged user, the kill rules) is
    the shared ``ProcessRunner``'s; see there. The command shares the host's CPUs, network,
    users and filesystem.
    """

    def __init__(
        self,
        *,
        name: str = "host",
        kill_grace_seconds: float,
        refuse_unenforceable_limits: bool,
        default_limits: ResourceLimits,
        max_limits: ResourceLimits,
        cgroups: CgroupMode = "auto",
        cgroup_parent: str = "expbuild",
        reuse_cgroups: bool = True,
        worker_id: str = "local",
        mountinfo: str | None = None,
        run_as: tuple[int, int] | None = None,
        run_as_uids: range | None = None,
    ) -> None:
        """See ``ProcessRunner`` for every argument."""
        self._name = name
        self._max_limits = max_limits
        self._default_limits = default_limits
        self._runner = ProcessRunner(
            kind="host",
            name=name,
            launcher=_PlainLaunch(),
            kill_grace_seconds=kill_grace_seconds,
            refuse_unenforceable_limits=refuse_unenforceable_limits,
            default_limits=default_limits,
            max_limits=max_limits,
            cgroups=cgroups,
            cgroup_parent=cgroup_parent,
            reuse_cgroups=reuse_cgroups,
            worker_id=worker_id,
            mountinfo=mountinfo,
            run_as=run_as,
            run_as_uids=run_as_uids,
        )

    async def start(self) -> None:
        """Set up cgroups and sweep what a previous run left (see ``ProcessRunner.start``)."""
        await self._runner.start()

    @property
    def name(self) -> str:
        return self._name

    @property
    def isolation(self) -> IsolationLevel:
        return IsolationLevel.HOST

    async def readiness(self) -> Readiness:
        return self._runner.readiness()

    async def capabilities(self) -> ExecutorCapabilities:
        """What this executor enforces, truthfully for the current user and machine: memory and
        processes as the runner can (cgroups, else rlimits); CPU and NETWORK never.
        ``details["cgroups"]`` says which is in use and why."""
        enforced, details = self._runner.enforced()
        unenforced = {ResourceLimit.CPU, ResourceLimit.NETWORK}
        if ResourceLimit.PROCESSES not in enforced:
            unenforced.add(ResourceLimit.PROCESSES)
        return ExecutorCapabilities(
            name=self._name,
            isolation=IsolationLevel.HOST,
            readiness=await self.readiness(),
            enforced_limits=frozenset(enforced),
            unenforced_limits=frozenset(unenforced),
            max_limits=self._max_limits,
            default_limits=self._default_limits,
            details={**details, "network": "the host's network, always"},
        )

    async def warmup(self, images: Sequence[str]) -> WarmupReport:
        return WarmupReport(name=self._name, ready=True, message="nothing to prepare")

    def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        """Run ``command``: Started, LogChunks as it writes, then one RunOutcome.

        Raises PreconditionError (before spawning) for limits this executor refuses, and
        UnavailableError once closed. A command that cannot start ends with FAILED_TO_START.
        """
        return self._runner.execute(command, stop)

    def hold_output(self, stop: StopSignal) -> None:
        """Stop reading the output of the command run with ``stop`` until it exits (by itself or
        by a stop): once its pipes are full, its writes block."""
        self._runner.hold_output(stop)

    def check(self, limits: ResourceLimits, image: str | None) -> None:
        """Refuses what ``execute`` would: a limit a plain process cannot have while
        ``refuse_unenforceable_limits`` is set. An image means nothing here and is ignored."""
        self._runner.check(limits)

    async def close(self) -> None:
        """Kill (SIGKILL) and reap every command still running, remove the cgroups; idempotent."""
        await self._runner.close()
