"""HostExecutor: runs a command as a plain process in its own process group, with no isolation."""

from __future__ import annotations

import asyncio
import functools
import os
import resource
from collections.abc import AsyncGenerator, Sequence

from expbuild_worker.errors import ConfigError, PreconditionError, UnavailableError
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.host._run import Run
from expbuild_worker.execution.host._spawn import Rlimit, SpawnFailure, resolve_executable, rlimit, spawn
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    RunOutcome,
    Started,
    WarmupReport,
)


class HostExecutor:
    """Runs each command as a plain child process of the worker: fast, and no isolation at all.

    The command gets exactly its own environment, its working directory under the action root,
    its own session and process group (killed as a whole when the command ends or is stopped),
    and RLIMIT_AS / RLIMIT_NPROC for its memory and process limits. It shares the host's CPUs,
    network, users and filesystem. A process that leaves the process group (setsid) escapes
    the group kill; only the container executors can contain that.
    """

    def __init__(
        self,
        *,
        name: str = "host",
        kill_grace_seconds: float,
        refuse_unenforceable_limits: bool,
        default_limits: ResourceLimits,
        max_limits: ResourceLimits,
    ) -> None:
        if kill_grace_seconds <= 0:
            raise ConfigError(
                f"executor {name!r}: kill_grace_seconds must be positive, got {kill_grace_seconds}"
            )
        self._name = name
        self._grace = kill_grace_seconds
        self._refuse = refuse_unenforceable_limits
        self._default_limits = default_limits
        self._max_limits = max_limits
        self._root = os.geteuid() == 0 or os.getuid() == 0
        self._runs: set[Run] = set()
        self._closed = False
        if refuse_unenforceable_limits:
            problem = self._unenforceable(default_limits)
            if problem:
                raise ConfigError(
                    f"executor {name!r}: default_limits.{problem} cannot be enforced by a host executor "
                    "while refuse_unenforceable_limits is true"
                )

    @property
    def name(self) -> str:
        return self._name

    @property
    def isolation(self) -> IsolationLevel:
        return IsolationLevel.HOST

    async def readiness(self) -> Readiness:
        if self._closed:
            return Readiness(False, f"host executor {self._name!r} is closed")
        if not hasattr(os, "pidfd_open"):
            return Readiness(False, "this platform has no pidfd_open (Linux 5.3 or later is needed)")
        return Readiness(True)

    async def capabilities(self) -> ExecutorCapabilities:
        """What this executor enforces, truthfully for the current user.

        RLIMIT_NPROC does not bind root, so PROCESSES is unenforced when running as root.
        MEMORY is RLIMIT_AS: address space, which a root command could raise again.
        """
        enforced = {ResourceLimit.MEMORY, ResourceLimit.TIMEOUT}
        unenforced = {ResourceLimit.CPU, ResourceLimit.NETWORK}
        (unenforced if self._root else enforced).add(ResourceLimit.PROCESSES)
        return ExecutorCapabilities(
            name=self._name,
            isolation=IsolationLevel.HOST,
            readiness=await self.readiness(),
            enforced_limits=frozenset(enforced),
            unenforced_limits=frozenset(unenforced),
            max_limits=self._max_limits,
            default_limits=self._default_limits,
            details={
                "euid": str(os.geteuid()),
                "memory": "RLIMIT_AS (address space) of each process"
                + ("; a command running as root can raise it" if self._root else ""),
                "processes": "not enforced: RLIMIT_NPROC does not apply to root"
                if self._root
                else "RLIMIT_NPROC (counts every process of the worker's user)",
                "network": "the host's network, always",
            },
        )

    async def warmup(self, images: Sequence[str]) -> WarmupReport:
        return WarmupReport(name=self._name, ready=True, message="nothing to prepare")

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        """Run ``command``: Started, LogChunks as it writes, then one RunOutcome.

        Raises PreconditionError (before spawning) for limits this executor refuses, and
        UnavailableError once closed. A command that cannot start ends with FAILED_TO_START.
        """
        if self._closed:
            raise UnavailableError(f"host executor {self._name!r} is closed")
        rlimits = self._rlimits(command)
        if stop.reason is not None:
            yield RunOutcome(status=stop.reason, message="stopped before the command started")
            return
        cwd = command.root / command.working_directory
        try:
            executable = resolve_executable(command.argv[0] if command.argv else "", command.environment, cwd)
            child = spawn(
                argv=command.argv,
                executable=executable,
                cwd=cwd,
                working_directory=command.working_directory,
                environment=command.environment,
                stdin=command.stdin,
                rlimits=rlimits,
            )
        except SpawnFailure as failure:
            yield RunOutcome(status=ExecutionStatus.FAILED_TO_START, message=str(failure))
            return
        run = Run(child=child, stdin=command.stdin, kill_grace_seconds=self._grace)
        self._runs.add(run)
        stop_waiter: asyncio.Task[ExecutionStatus] | None = None
        try:
            run.start()
            # Acted on in a callback, so a consumer that is slow to pull events cannot delay the kill.
            stop_waiter = asyncio.ensure_future(stop.wait())
            stop_waiter.add_done_callback(functools.partial(_on_stop, run))
            yield Started(at=run.started_at)
            while True:
                run.wake.clear()
                yielded = False
                for pipe in run.pipes:
                    while (chunk := run.take_chunk(pipe)) is not None:
                        yield chunk
                        yielded = True
                if run.exited or run.released:
                    if run.pipes_closed:
                        if not yielded:
                            break
                    elif run.drain_expired():
                        run.final_drain()
                        continue
                if not yielded:
                    await run.wake.wait()
            yield run.outcome()
        finally:
            if stop_waiter is not None:
                stop_waiter.cancel()
            run.release()
            self._runs.discard(run)

    async def close(self) -> None:
        """Kill (SIGKILL) and reap every command still running; idempotent."""
        self._closed = True
        for run in list(self._runs):
            run.abort(ExecutionStatus.CANCELLED, f"host executor {self._name!r} closed while the command ran")

    # ---- limits ---------------------------------------------------------------------------

    def _unenforceable(self, limits: ResourceLimits) -> str:
        """The first limit in ``limits`` a plain process cannot honour, as ``field=value``; '' if none."""
        if limits.cpu_cores is not None:
            return f"cpu_cores={limits.cpu_cores:g} (a plain process shares every host CPU)"
        if limits.network is False:
            return "network=false (a plain process always has the host's network)"
        if limits.max_processes is not None and self._root:
            return f"max_processes={limits.max_processes} (RLIMIT_NPROC does not apply to root)"
        return ""

    def _rlimits(self, command: Command) -> list[Rlimit]:
        """Check ``command.limits`` against this executor's policy and turn them into rlimits.

        Unset limits take the default, then the maximum (a maximum caps every action); a limit
        above the maximum, or one this executor cannot enforce while refusing those, is a
        PreconditionError.
        """
        limits = command.limits.with_defaults(self._default_limits)
        for field in ("cpu_cores", "memory_bytes", "max_processes"):
            value, cap = getattr(limits, field), getattr(self._max_limits, field)
            if value is not None and cap is not None and value > cap:
                raise PreconditionError(
                    f"host executor {self._name!r} cannot run action {command.execution_id}: "
                    f"limits.{field}={value:g} exceeds the maximum {cap:g}"
                )
        if self._refuse:
            problem = self._unenforceable(limits)
            if problem:
                raise PreconditionError(
                    f"host executor cannot enforce limits.{problem} for action {command.execution_id} "
                    f"(executor {self._name!r})"
                )
        memory = limits.memory_bytes if limits.memory_bytes is not None else self._max_limits.memory_bytes
        processes = (
            limits.max_processes if limits.max_processes is not None else self._max_limits.max_processes
        )
        rlimits: list[Rlimit] = []
        if memory is not None:
            rlimits.append(rlimit(resource.RLIMIT_AS, memory))
        if processes is not None and not self._root:
            rlimits.append(rlimit(resource.RLIMIT_NPROC, processes))
        return rlimits


def _on_stop(run: Run, waiter: asyncio.Task[ExecutionStatus]) -> None:
    if not waiter.cancelled():
        run.request_stop(waiter.result())
