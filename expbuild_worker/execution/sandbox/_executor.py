"""SandboxExecutor: each command in its own bubblewrap namespaces, on the host executor's process runner."""

from __future__ import annotations

import asyncio
import posixpath
import shutil
import subprocess
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

from expbuild_worker.config import SANDBOX_ROOT_PATHS, CgroupMode
from expbuild_worker.errors import ConfigError
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.process import Launch, ProcessRunner, SpawnFailure
from expbuild_worker.execution.sandbox._view import SandboxView, bwrap_arguments, view_of
from expbuild_worker.model import (
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    WarmupReport,
)

_PROBE_TIMEOUT_SECONDS = 10.0


class _BwrapLaunch:
    """The sandbox's launcher: argv wrapped in bubblewrap, argv[0] looked up in the sandbox's view."""

    own_processes = 2
    """bubblewrap's monitor outside the sandbox and its init (pid 1) inside, around the command."""

    def __init__(
        self,
        *,
        bwrap: str,
        view: SandboxView,
        work_directory: str,
        tmpfs_size_bytes: int,
        allow_network: bool,
        hostname: str,
    ) -> None:
        self.bwrap = bwrap
        self.view = view
        self.work_directory = work_directory
        self.tmpfs_size_bytes = tmpfs_size_bytes
        self.allow_network = allow_network
        self.hostname = hostname

    def unenforceable(self, limits: ResourceLimits) -> str:
        if limits.cpu_cores is not None:
            return f"cpu_cores={limits.cpu_cores:g} (a sandbox shares every host CPU)"
        return ""

    def unavailable(self, limits: ResourceLimits) -> str:
        if limits.network is True and not self.allow_network:
            return (
                "network=NETWORK_ACCESS_ENABLED (allow_network is false: a sandbox has only its own loopback)"
            )
        return ""

    def launch(self, command: Command, cwd: Path) -> Launch:
        if not cwd.is_dir():
            raise SpawnFailure(f"working directory {command.working_directory or '.'!r}: not a directory")
        inside = posixpath.normpath(posixpath.join(self.work_directory, command.working_directory))
        view = SandboxView(
            binds={**self.view.binds, self.work_directory: str(command.root)}, links=self.view.links
        )
        # Looked up here, not left to bubblewrap, so a missing command is FAILED_TO_START with a
        # reason rather than exit code 1 and bubblewrap's message in stderr. The argv is passed
        # on unchanged: bubblewrap's execvp finds the same file on the same PATH.
        view.find_executable(command.argv[0] if command.argv else "", command.environment, inside)
        options = bwrap_arguments(
            view,
            work_directory=self.work_directory,
            cwd=inside,
            network=bool(command.limits.network) and self.allow_network,
            tmpfs_size_bytes=self.tmpfs_size_bytes,
            hostname=self.hostname,
        )
        return Launch(
            argv=[self.bwrap, *options, "--", *command.argv], executable=self.bwrap, cwd=command.root
        )


class SandboxExecutor:
    """Runs each command in a bubblewrap sandbox: new user, PID, network, IPC, UTS, mount and
    cgroup namespaces, a read-only view of ``root_paths``, a private ``/tmp`` and the action
    directory writable at ``work_directory``; no network unless the request asks for it and
    ``allow_network`` permits, no capabilities, no new privileges, no nested user namespaces.

    Spawning, streaming, stopping, cgroups (usage, memory and process limits, everything killed
    at the end) and the unprivileged user are the ``ProcessRunner``'s, as for the host
    executor; bubblewrap is the process it starts, in the action's cgroup, and the command
    runs as that user's uid inside. A command killed by signal N is reported as exit code
    128+N (bubblewrap's own exit status), as the Docker executor does.
    """

    def __init__(
        self,
        *,
        name: str = "sandbox",
        bwrap: str = "bwrap",
        root_paths: Sequence[str] = SANDBOX_ROOT_PATHS,
        work_directory: str = "/work",
        tmpfs_size_bytes: int = 256 << 20,
        allow_network: bool = False,
        hostname: str = "sandbox",
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
        """``bwrap`` is the bubblewrap program (a name is looked up on the worker's PATH once,
        here); the rest is as for ``ProcessRunner``. Raises ConfigError for a relative or
        system path in ``root_paths`` or ``work_directory``."""
        for path in (*root_paths, work_directory):
            if not path.startswith("/") or posixpath.normpath(path) != path:
                raise ConfigError(f"executor {name!r}: expected a normalized absolute path, got {path!r}")
        if work_directory in ("/", "/proc", "/dev", "/tmp") or work_directory in root_paths:
            raise ConfigError(
                f"executor {name!r}: work_directory {work_directory!r} would hide a system path"
            )
        if tmpfs_size_bytes <= 0:
            raise ConfigError(f"executor {name!r}: tmpfs_size_bytes must be positive, got {tmpfs_size_bytes}")
        self._name = name
        self._bwrap = shutil.which(bwrap) if "/" not in bwrap else bwrap
        self._bwrap_name = bwrap
        self._default_limits = default_limits
        self._max_limits = max_limits
        self._root_paths = tuple(root_paths)
        self._work_directory = work_directory
        self._tmpfs_size_bytes = tmpfs_size_bytes
        self._allow_network = allow_network
        self._launcher = _BwrapLaunch(
            bwrap=self._bwrap or bwrap,
            view=view_of(root_paths),
            work_directory=work_directory,
            tmpfs_size_bytes=tmpfs_size_bytes,
            allow_network=allow_network,
            hostname=hostname,
        )
        self._runner = ProcessRunner(
            kind="sandbox",
            name=name,
            launcher=self._launcher,
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
        self._probe: Readiness | None = None
        self._version = ""

    async def start(self) -> None:
        """Set up cgroups, sweep what a previous run left, and try bubblewrap once (readiness)."""
        await self._runner.start()
        await self._probe_bwrap()

    @property
    def name(self) -> str:
        return self._name

    @property
    def isolation(self) -> IsolationLevel:
        return IsolationLevel.NAMESPACE_SANDBOX

    async def _probe_bwrap(self) -> Readiness:
        """Run ``true`` in an empty sandbox once, as the commands' user: bubblewrap may be missing,
        or user namespaces forbidden to that user (a sysctl, a container's seccomp profile)."""
        if self._probe is not None:
            return self._probe
        if self._bwrap is None:
            self._probe = Readiness(False, f"bubblewrap ({self._bwrap_name!r}) is not installed on this host")
            return self._probe
        run_as = self._runner.run_as
        argv = [
            self._bwrap,
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--ro-bind",
            "/",
            "/",
            "--",
            "true",
        ]
        try:
            result = await asyncio.to_thread(
                subprocess.run,
                argv,
                capture_output=True,
                env={},
                timeout=_PROBE_TIMEOUT_SECONDS,
                user=run_as[0] if run_as is not None else None,
                group=run_as[1] if run_as is not None else None,
                extra_groups=[] if run_as is not None else None,
                check=False,
            )
            version = await asyncio.to_thread(
                subprocess.run, [self._bwrap, "--version"], capture_output=True, env={}, check=False
            )
        except (OSError, subprocess.SubprocessError) as err:
            self._probe = Readiness(False, f"bubblewrap {self._bwrap!r} could not run: {err}")
            return self._probe
        self._version = version.stdout.decode(errors="replace").strip()
        if result.returncode != 0:
            why = result.stderr.decode(errors="replace").strip() or f"exit code {result.returncode}"
            self._probe = Readiness(False, f"bubblewrap cannot make a sandbox here: {why}")
        else:
            self._probe = Readiness(True)
        return self._probe

    async def readiness(self) -> Readiness:
        ready = self._runner.readiness()
        return await self._probe_bwrap() if ready.ready else ready

    async def capabilities(self) -> ExecutorCapabilities:
        """Memory and processes as the runner enforces them (cgroups, else rlimits); NETWORK (no
        network namespace shared, unless asked for and allowed); CPU never."""
        enforced, details = self._runner.enforced()
        enforced.add(ResourceLimit.NETWORK)
        unenforced = {ResourceLimit.CPU}
        if ResourceLimit.PROCESSES not in enforced:
            unenforced.add(ResourceLimit.PROCESSES)
        readiness = await self.readiness()
        view = self._launcher.view
        return ExecutorCapabilities(
            name=self._name,
            isolation=IsolationLevel.NAMESPACE_SANDBOX,
            readiness=readiness,
            enforced_limits=frozenset(enforced),
            unenforced_limits=frozenset(unenforced),
            max_limits=self._max_limits,
            default_limits=self._default_limits,
            details={
                **details,
                "sandbox": f"{self._version or 'bubblewrap'}: new user, pid, network, ipc, uts, mount "
                "and cgroup namespaces; no capabilities, no new privileges, no nested user namespaces",
                "root": "read-only: " + ", ".join(sorted([*view.binds, *view.links])),
                "work_directory": f"{self._work_directory} (the action directory, writable)",
                "tmp": f"a private tmpfs of {self._tmpfs_size_bytes} bytes (charged to the memory limit)",
                "network": (
                    "loopback only; the host's network when a request asks for it"
                    if self._allow_network
                    else "loopback only; requests for network are refused"
                ),
            },
        )

    async def warmup(self, images: Sequence[str]) -> WarmupReport:
        ready = await self.readiness()
        return WarmupReport(name=self._name, ready=ready.ready, message=ready.message or "nothing to prepare")

    def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        """Run ``command`` in a sandbox: Started, LogChunks as it writes, then one RunOutcome.

        Raises PreconditionError (before spawning) for limits this executor refuses (network
        access when not allowed, and what it cannot enforce while refusing that), and
        UnavailableError once closed. A command that cannot start ends with FAILED_TO_START.
        """
        return self._runner.execute(command, stop)

    def hold_output(self, stop: StopSignal) -> None:
        """Stop reading the output of the command run with ``stop`` until it exits."""
        self._runner.hold_output(stop)

    def check(self, limits: ResourceLimits, image: str | None) -> None:
        """Refuses what ``execute`` would. An image means nothing here and is ignored."""
        self._runner.check(limits)

    async def close(self) -> None:
        """Kill (SIGKILL) and reap every command still running, remove the cgroups; idempotent."""
        await self._runner.close()
