"""DockerExecutor: each command in its own hardened container, from create to guaranteed removal."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import posixpath
import re
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import docker.errors
import requests.exceptions

from expbuild_worker.config import DockerExecutorConfig, IoMode
from expbuild_worker.errors import (
    ConfigError,
    InternalError,
    OutputLimitExceeded,
    PreconditionError,
    UnavailableError,
    WorkerError,
)
from expbuild_worker.execution.agent import BINARY_NAME as AGENT_BINARY_NAME
from expbuild_worker.execution.agent import bundled_agent, usable_agent
from expbuild_worker.execution.cgroups import (
    ActionCgroups,
    CgroupReading,
    OomWatch,
    read_mountinfo,
    worker_key,
)
from expbuild_worker.execution.docker._agent import (
    AGENT_MOUNT,
    SOCKET_NAME,
    AgentListener,
    AgentLost,
    CommandNotStarted,
    PipeStreams,
    exit_code,
)
from expbuild_worker.execution.docker._archive import (
    UnsafeArchiveError,
    clear_output,
    distinct_outputs,
    pack_root,
    unpack_output,
)
from expbuild_worker.execution.docker._attach import AttachedStreams
from expbuild_worker.execution.docker._daemon import DockerDaemon, explain, status_of
from expbuild_worker.execution.docker._images import ImagePolicy
from expbuild_worker.execution.docker._janitor import Janitor, remove_container
from expbuild_worker.execution.docker._pool import (
    LABEL_POOL,
    ContainerCounters,
    ContainerPool,
    PoolKey,
    Slot,
    empty_directory,
    make_shared_mount_point,
    mount_bind,
    mounts_at,
    release_mount_point,
    unmount,
)
from expbuild_worker.execution.docker._spec import (
    ARCHIVE_ROOT,
    ARCHIVE_VOLUME,
    LABEL_ACTION,
    LABEL_CREATED,
    LABEL_EXECUTION,
    LABEL_EXECUTOR,
    LABEL_PROJECT,
    LABEL_WORKER,
    PROJECT,
    RUNTIME_INIT_PIDS,
    Hardening,
    container_body,
    exact_pids_max,
    is_virtualized_runtime,
    network_mode_for,
    numeric_user,
    root_in_container,
)
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.proc_stat import PARENT, stat_fields
from expbuild_worker.execution.process import CommandPipes
from expbuild_worker.fs import directories
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    LogChunk,
    LogStream,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    ResourceUsage,
    RunOutcome,
    Started,
    WarmupReport,
)

_log = logging.getLogger(__name__)
T = TypeVar("T")

_WAIT_SLICE_SECONDS = 30.0
"""A blocking wait is re-issued this often, so no pool thread is held by one call forever."""

_CLOSE_WAIT_SECONDS = 10.0
"""How long ``close`` waits for running actions to wind down after their containers are removed."""

_READINESS_TTL_SECONDS = 2.0
"""Readiness is cached this long: it may be asked per action, and pings cost a round trip."""

_TINI_EXEC_FAILED = re.compile(rb"^\[FATAL tini \(\d+\)\] exec (.*) failed: ([^\n]*)")
_STDERR_HEAD = 512

_AGENT_DIR_SUFFIX = ".agent"

_AGENT_CONNECT_SECONDS = 10.0
"""How long a new pool container's agent has to connect back (it does so as its first act)."""

RECYCLE_PROPERTY = "recycle-runner"
"""Platform property (``true``) asking for a recycled pool container instead of a fresh one."""


_STOPPED = (
    ExecutionStatus.TIMED_OUT,
    ExecutionStatus.CANCELLED,
    ExecutionStatus.OOM_KILLED,
    ExecutionStatus.OUTPUT_LIMIT_EXCEEDED,
    ExecutionStatus.DISK_LIMIT_EXCEEDED,
)

MIN_MEMORY_BYTES = 6 << 20
"""The smallest memory limit the daemon accepts for a container."""
MIN_CPU_CORES = 0.01
"""The smallest CPU limit the daemon can express (its unit is 1e-9 CPU, and it refuses below 0.01)."""


@dataclass(frozen=True, slots=True)
class DaemonFacts:
    """What the daemon said about itself (``docker info``), learned once per connection."""

    version: str
    api_version: str
    runtimes: tuple[str, ...]
    default_runtime: str
    cgroup_version: str
    cgroup_driver: str
    memory_limit: bool
    swap_limit: bool
    pids_limit: bool
    cpu_quota: bool
    cpus: int = 0  # the daemon machine's CPU count; 0 = not reported
    reports_oom_kills: bool = True  # False for Podman: State.OOMKilled stays false on cgroup v1

    @classmethod
    def from_info(cls, info: dict[str, Any], api_version: str) -> DaemonFacts:
        return cls(
            version=str(info.get("ServerVersion", "")),
            api_version=api_version,
            runtimes=tuple(sorted(info.get("Runtimes") or {})),
            default_runtime=str(info.get("DefaultRuntime", "")),
            cgroup_version=str(info.get("CgroupVersion", "1")),
            cgroup_driver=str(info.get("CgroupDriver", "")),
            memory_limit=bool(info.get("MemoryLimit", False)),
            swap_limit=bool(info.get("SwapLimit", False)),
            pids_limit=bool(info.get("PidsLimit", False)),
            cpu_quota=bool(info.get("CpuCfsQuota", False)),
            cpus=int(info.get("NCPU") or 0),
        )


@dataclass(eq=False)
class _Run:
    """One action's container, from token registration to removal."""

    token: str
    execution_id: str
    stop: StopSignal | None = None
    container_id: str | None = None
    creating: asyncio.Future[Any] | None = None  # the create call, which runs to its end even if we stop
    streams: AttachedStreams | PipeStreams | None = None
    exit_watch: asyncio.Future[Any] | None = None  # only while its output is held
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    killed: bool = False
    escalated: bool = False
    aborted: bool = False
    started_at: float = 0.0
    stderr_head: bytearray = field(default_factory=bytearray)
    stdout_head: bytearray = field(default_factory=bytearray)  # the runtime's own exec errors come here
    stopper: asyncio.Future[None] | None = None  # acts on a stop request while the command runs
    oom_watch: OomWatch | None = None  # when the action's cgroup parent holds its memory limit
    stdin_task: asyncio.Future[None] | None = None
    slot: Slot | None = None  # the pool container the action entered by exec, if any
    recycle: bool = False  # give the pool container back after a clean-up instead of removing it
    exec_id: str = ""
    exec_pid: int = 0
    reaper: asyncio.Future[None] | None = None  # ends the exec'd command's leftovers when it exits
    dirty: bool = False  # stopped, OOM or failed: a recycled container is not handed out again
    agent_exit: asyncio.Future[int] | None = None  # the command's wait status, from the container's agent


def prepare_root(root: Path, owner: tuple[int, int] | None) -> None:
    """Let the command's user write every directory of the staged root, never touching files.

    Directories are given to ``owner`` (a numeric user); when there is none, or the worker
    may not chown, they are made writable by everyone instead. Files keep their owner and
    mode, so a command cannot rewrite an input in place (it may be a hard link into the
    worker's store). Symlinks are never followed.
    """
    for dirpath in directories(root):
        if owner is not None:
            try:
                os.chown(dirpath, owner[0], owner[1], follow_symlinks=False)
                continue
            except PermissionError:
                owner = None
        os.chmod(dirpath, os.lstat(dirpath).st_mode & 0o7777 | 0o777)


class DockerExecutor:
    """Runs each command in a fresh, hardened container on one Docker daemon.

    Lifecycle per action: create → attach → start → stream logs → wait → inspect → (archive
    I/O: copy outputs back) → outcome → remove. Removal is guaranteed: after the outcome it
    runs when the consumer finishes or closes the iterator; on any earlier exit (exception,
    cancellation, early close) the container is removed before ``execute`` returns. A worker
    that dies anyway leaves containers labelled with its id, which the janitor removes at the
    next start and periodically.

    Call ``await start()`` once after construction (learns the daemon, sweeps orphans, starts
    the periodic sweep) and ``await close()`` at shutdown.
    """

    def __init__(
        self,
        *,
        name: str,
        config: DockerExecutorConfig,
        worker_id: str,
        daemon: DockerDaemon,
        seccomp_profile: str = "",
        mountinfo: str | None = None,
        capacity: int = 0,
    ) -> None:
        if not worker_id:
            raise ValueError("worker_id must not be empty: it labels this worker's containers")
        self._name = name
        self._config = config
        self._worker_id = worker_id
        self._daemon = daemon
        self._hardening = Hardening.from_config(config, seccomp_profile=seccomp_profile)
        self._owner = numeric_user(config.user)
        self._root_user = (self._owner is not None and self._owner[0] == 0) or config.user == "root"
        self._io_mode: IoMode = (
            ("bind" if daemon.is_local else "archive") if config.io_mode == "auto" else config.io_mode
        )
        self._default_limits = config.default_limits.to_limits()
        self._max_limits = config.max_limits.to_limits()
        self._images = ImagePolicy(
            daemon=daemon,
            executor=name,
            default_image=config.image,
            allowed_images=config.allowed_images,
            warmup_images=config.warmup_images,
            pull_policy=config.effective_pull_policy,
        )
        self._mountinfo = mountinfo
        self._facts: DaemonFacts | None = None
        self._cgroups: ActionCgroups | None = None
        self._runs: dict[str, _Run] = {}
        self._cleanups: set[asyncio.Future[None]] = set()
        self._readiness: tuple[float, Readiness] | None = None
        self._capacity = config.max_concurrency or capacity
        self._making: set[str] = set()
        self._pool: ContainerPool | None = None
        self._pool_dir = (
            Path(tempfile.gettempdir()) / f"expbuild-pool-{worker_key(worker_id)}-{worker_key(name)}"
        )
        if config.pool.enabled and self._io_mode == "bind" and os.geteuid() == 0:
            self._pool = ContainerPool(
                config=config.pool,
                make=self._make_slot,
                discard=self._discard_slot,
                alive=self._slot_alive,
                room=self._room,
            )
        elif config.pool.enabled:
            _log.warning(
                "docker executor %s: the container pool needs bind I/O and a root worker; running cold", name
            )
        self._agent = self._choose_agent() if self._pool is not None else None
        self._janitor = Janitor(
            daemon=daemon,
            worker_id=worker_id,
            executor=name,
            live_tokens=self._live_tokens,
            cgroups=lambda: self._cgroups,
            interval=config.orphan_sweep_interval_seconds,
        )
        self._started = False
        self._closed = False

    def _choose_agent(self) -> Path | None:
        """The agent binary pool containers run as PID 1; None to enter them by the engine's exec.

        Raises ConfigError when the agent is required (``on``) and cannot be used."""
        pool = self._config.pool
        if pool.agent == "off":
            return None
        path = Path(pool.agent_path) if pool.agent_path else bundled_agent()
        problem = usable_agent(path)
        if not problem and is_virtualized_runtime(self._config.runtime):
            problem = (
                f"runtime {self._config.runtime!r} has a kernel of its own: a socket bound into "
                "its containers is not the host's"
            )
        if problem and pool.agent == "on":
            raise ConfigError(f"executor.{self._name}.pool.agent: 'on', but {problem}")
        if problem:
            _log.warning(
                "docker executor %s: pool containers are entered by the engine's exec (slower): %s",
                self._name,
                problem,
            )
            return None
        return path

    # ---- identity and lifecycle -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._name

    @property
    def isolation(self) -> IsolationLevel:
        if is_virtualized_runtime(self._config.runtime):
            return IsolationLevel.VIRTUALIZED
        return IsolationLevel.CONTAINER

    @property
    def io_mode(self) -> IoMode:
        """``bind`` (the action directory is mounted) or ``archive`` (copied in and out)."""
        return self._io_mode

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def start(self) -> None:
        """Learn the daemon, remove what a previous run of this worker left, start the sweeper.

        A daemon that does not answer is not fatal: the executor reports itself not ready and
        learns the daemon on first use.
        """
        if self._started:
            return
        self._started = True
        try:
            await self._learn_daemon()
            await self._janitor.sweep()
            if self._pool is not None:
                await self._daemon.offload(self._sweep_mount_points)
                if self._config.image and self._cgroups is not None:
                    self._pool.want(self._default_key())
        except WorkerError as err:
            _log.warning("docker executor %s: %s", self._name, err)
        self._janitor.start_periodic()

    async def close(self) -> None:
        """Stop the sweeper, remove every container this executor still owns; idempotent."""
        if self._closed:
            return
        self._closed = True
        await self._janitor.stop()
        if self._pool is not None:
            await self._pool.close()
        for run in list(self._runs.values()):
            run.aborted = True
            if run.container_id is not None:
                self._track(self._remove_quietly(run.container_id))
        # Let running actions see their container go and report CANCELLED while the daemon
        # connection still works; one whose consumer stopped pulling is left to the janitor.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _CLOSE_WAIT_SECONDS
        while self._runs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._cleanups:
            await asyncio.gather(*list(self._cleanups), return_exceptions=True)
        if self._pool is not None:  # containers given back meanwhile, or still being made
            await self._pool.close()
            with contextlib.suppress(Exception):
                await self._janitor.sweep()
            await self._daemon.offload(self._sweep_mount_points)
        if self._cgroups is not None:
            self._cgroups.remove_base()
        self._daemon.close()

    # ---- daemon facts, readiness, capabilities ----------------------------------------------

    async def _learn_daemon(self) -> DaemonFacts:
        if self._facts is not None:
            return self._facts

        def learn(api: Any) -> DaemonFacts:
            facts = DaemonFacts.from_info(api.info(), str(api.api_version))
            components = api.version().get("Components") or []
            if any("podman" in str(c.get("Name", "")).lower() for c in components):
                facts = dataclasses.replace(facts, reports_oom_kills=False)
            return facts

        facts = await self._daemon.call(learn)
        if self._daemon.is_local and self._config.cgroup_parent:
            mountinfo = self._mountinfo if self._mountinfo is not None else read_mountinfo()
            self._cgroups = ActionCgroups.detect(
                cgroup_version=facts.cgroup_version,
                cgroup_driver=facts.cgroup_driver,
                parent=self._config.cgroup_parent,
                worker_id=self._worker_id,
                executor=self._name,
                mountinfo=mountinfo,
            )
        self._facts = facts
        return facts

    async def readiness(self) -> Readiness:
        """Ready when the daemon answers, the runtime exists and (with ``never``) the image is present."""
        if self._closed:
            return Readiness(False, f"docker executor {self._name!r} is closed")
        now = time.monotonic()
        if self._readiness is not None and now < self._readiness[0]:
            return self._readiness[1]
        readiness = await self._check_readiness()
        self._readiness = (now + _READINESS_TTL_SECONDS, readiness)
        return readiness

    async def _check_readiness(self) -> Readiness:
        try:
            await self._daemon.call(lambda api: api.ping())
            facts = await self._learn_daemon()
            if self._config.runtime and self._config.runtime not in facts.runtimes:
                return Readiness(
                    False,
                    f"runtime {self._config.runtime!r} is not installed on the engine "
                    f"(it has {', '.join(facts.runtimes)})",
                )
            if self._config.image and not await self._images.present(self._config.image):
                if self._images.pull_policy == "never":
                    return Readiness(
                        False, f"image {self._config.image!r} is not present and pull_policy is 'never'"
                    )
                return Readiness(True, f"image {self._config.image!r} will be pulled on first use")
        except WorkerError as err:
            return Readiness(False, str(err))
        except docker.errors.DockerException as err:
            return Readiness(False, f"docker engine at {self._daemon.address}: {explain(err)}")
        return Readiness(True)

    async def capabilities(self) -> ExecutorCapabilities:
        """Live daemon facts: version, runtimes, cgroup version, limit support, images present."""
        readiness = await self.readiness()
        facts: DaemonFacts | None = None
        present: list[str] = []
        with contextlib.suppress(WorkerError, docker.errors.DockerException):
            facts = await self._learn_daemon()
            for image in self._images.warmup_images:
                if await self._images.present(image):
                    present.append(image)
        enforced = {ResourceLimit.NETWORK, ResourceLimit.TIMEOUT}
        unenforced: set[ResourceLimit] = set()
        if self._io_mode == "archive":  # it writes to a volume on the daemon, not the action directory
            unenforced.add(ResourceLimit.DISK)
        # Under a virtualizing runtime (gVisor) the command's processes are not host processes:
        # the PIDs limit bounds only the runtime's own threads, and a fork burst ends the whole
        # sandbox instead of failing fork(). Not a process limit, so not claimed as one.
        virtualized = is_virtualized_runtime(self._config.runtime)
        for limit, supported in (
            (ResourceLimit.CPU, facts is None or facts.cpu_quota),
            (ResourceLimit.MEMORY, facts is None or facts.memory_limit),
            (ResourceLimit.PROCESSES, (facts is None or facts.pids_limit) and not virtualized),
        ):
            (enforced if supported else unenforced).add(limit)
        details = {
            "engine": self._daemon.address,
            "io_mode": self._io_mode,
            "image": self._config.image,
            "pull_policy": self._images.pull_policy,
            "network_mode": self._hardening.network_mode,
            "network_mode_when_enabled": self._hardening.network_mode_when_enabled or "(network refused)",
            "user": self._hardening.user or "(image default)",
            "runtime": self._config.runtime or "(engine default)",
            "readonly_rootfs": str(self._hardening.readonly_rootfs).lower(),
            "security_opts": ",".join(
                o.split("=", 1)[0] if o.startswith("seccomp=") else o for o in self._hardening.security_opts
            ),
            "pool": (
                "off"
                if self._pool is None
                else "entered through the in-container agent"
                if self._agent is not None
                else "entered by the engine's exec"
            ),
            "stats": (
                f"cgroup v{self._cgroups.version} files of a per-action parent cgroup"
                if self._cgroups is not None
                else "unavailable (engine not local or not cgroupfs)"
            ),
        }
        if facts is not None:
            details.update(
                engine_version=facts.version,
                api_version=facts.api_version,
                runtimes=",".join(facts.runtimes),
                default_runtime=facts.default_runtime,
                cgroup_version=facts.cgroup_version,
                cgroup_driver=facts.cgroup_driver,
                memory_limit_supported=str(facts.memory_limit).lower(),
                swap_limit_supported=str(facts.swap_limit).lower(),
                pids_limit_supported=str(facts.pids_limit).lower(),
                cpu_quota_supported=str(facts.cpu_quota).lower(),
            )
        return ExecutorCapabilities(
            name=self._name,
            isolation=self.isolation,
            readiness=readiness,
            enforced_limits=frozenset(enforced),
            unenforced_limits=frozenset(unenforced),
            max_limits=self._max_limits,
            default_limits=self._default_limits,
            details=details,
            images_present=tuple(present),
        )

    async def warmup(self, images: Sequence[str]) -> WarmupReport:
        """Make the configured images (and allowed ``images``) present per the pull policy."""
        try:
            await self._learn_daemon()
            result = await self._images.warmup(images)
            if self._pool is not None and self._cgroups is not None:
                keys = [self._default_key()] if self._config.image else []
                keys += [
                    PoolKey.of(image, self._hardening.network_mode, self._default_limits)
                    for image in images
                    if image != self._config.image and image in result.present
                ]
                await self._pool.fill(keys)
        except WorkerError as err:
            return WarmupReport(name=self._name, ready=False, message=str(err))
        self._readiness = None
        return WarmupReport(
            name=self._name,
            ready=not result.problems,
            message="; ".join(result.problems),
            images_present=result.present,
        )

    # ---- running a command -------------------------------------------------------------------

    def check(self, limits: ResourceLimits, image: str | None) -> None:
        """Refuses what ``execute`` would before anything runs: an image that is not allowed,
        network access this executor does not grant, limits the daemon would refuse (too little
        memory or CPU, more CPUs than its machine has, once it has said how many). Limits above the
        configured maxima are the daemon's to refuse."""
        self._images.resolve(image)
        self._check_limits(limits)

    def _check_limits(self, limits: ResourceLimits) -> str:
        """Refuse limits this executor cannot give; returns the network mode to use."""
        if limits.memory_bytes is not None and limits.memory_bytes < MIN_MEMORY_BYTES:
            raise PreconditionError(
                f"limits.memory_bytes: {limits.memory_bytes} is below the {MIN_MEMORY_BYTES} bytes a "
                "container needs at least (the engine's minimum)"
            )
        if limits.cpu_cores is not None and limits.cpu_cores < MIN_CPU_CORES:
            raise PreconditionError(
                f"limits.cpu_cores: {limits.cpu_cores:g} is below the smallest the engine takes, "
                f"{MIN_CPU_CORES:g}"
            )
        cpus = self._facts.cpus if self._facts is not None else 0
        if limits.cpu_cores is not None and cpus and limits.cpu_cores > cpus:
            raise PreconditionError(
                f"limits.cpu_cores: {limits.cpu_cores:g} is more than the {cpus} CPUs of executor "
                f"{self._name!r}'s engine"
            )
        return network_mode_for(limits, self._hardening, executor=self._name)

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        """Run ``command`` in a new container: Started, LogChunks as it writes, one RunOutcome.

        The steps of one container's life — prepare, create, attach, start, stream, wait,
        collect, dispose — are methods of their own, so a pool can do the early ones ahead.

        Raises PreconditionError before anything runs for an image that is not allowed, missing
        (``never``) or cannot be pulled, a network request this executor refuses, or limits
        above its maxima; UnavailableError when the daemon does not answer or once closed.
        """
        if self._closed:
            raise UnavailableError(f"docker executor {self._name!r} is closed")
        image = self._images.resolve(command.image)
        network_mode = self._check_limits(command.limits)
        await self._learn_daemon()
        run = _Run(token=uuid.uuid4().hex, execution_id=command.execution_id, stop=stop)
        self._runs[run.token] = run
        outcome_sent = False
        try:
            early = await self._prepare(run, command, stop, image)
            if early is None and self._lend(run, command, image, network_mode):
                early = await self._enter(run, command)
            elif early is None:
                early = await self._create_container(run, command, stop, image, network_mode)
                if early is None:
                    early = await self._attach(run, command, stop)
                if early is None:
                    early = await self._start(run, command)
            if early is not None:
                outcome_sent = True
                yield early
                return
            yield Started(at=run.started_at)
            async for chunk in self._stream(run):
                yield chunk
            state = await (self._wait_exec(run) if run.slot is not None else self._wait(run))
            outcome = await self._collect(run, command, stop, state)
            outcome_sent = True
            yield outcome
        finally:
            for task in (run.stopper, run.stdin_task, run.exit_watch, run.reaper):
                if task is not None:
                    task.cancel()
            if run.streams is not None:
                run.streams.close()
            if run.oom_watch is not None:
                run.oom_watch.close()
            if not outcome_sent:
                run.dirty = True  # abandoned before its end: its container is not lent again
            cleanup = self._track(self._dispose(run))
            if not outcome_sent:
                await asyncio.shield(cleanup)

    # ---- the steps of one container's life -----------------------------------------------------

    async def _prepare(self, run: _Run, command: Command, stop: StopSignal, image: str) -> RunOutcome | None:
        """Pull when the policy is ``always``; let the command's user write the staged root.

        An outcome when ``stop`` came during the pull, else None."""
        if self._images.pull_policy == "always" and not await self._until_stopped(
            self._images.pull(image), stop
        ):
            return RunOutcome(status=_reason(stop), message="stopped while the image was pulled")
        if self._io_mode == "bind" and not self._root_user:
            await self._daemon.offload(prepare_root, command.root, self._owner)
        return None

    async def _create_container(
        self, run: _Run, command: Command, stop: StopSignal, image: str, network_mode: str
    ) -> RunOutcome | None:
        """Create the action's container (archive I/O: and copy the root in); an outcome when stopped."""
        memory = command.limits.memory_bytes
        if memory is not None and self._cgroups is not None and self._memory_in_parent():
            run.oom_watch = self._cgroups.hold_memory_limit(run.token, memory)
        body = container_body(
            image=image,
            command=command,
            hardening=self._hardening,
            network_mode=network_mode,
            labels=self._labels(run.token, command.execution_id),
            io_mode=self._io_mode,
            cgroup_parent=self._cgroups.parent_for(run.token) if self._cgroups is not None else None,
            pids_room=self._pids_room(),
            memory_in_parent=run.oom_watch is not None,
        )
        created = await self._create(body, image, run, command, stop)
        if created is None:
            return RunOutcome(status=_reason(stop), message="stopped before the container started")
        run.container_id = created
        if self._io_mode == "archive":
            await self._daemon.call(lambda api: self._put_root(api, created, command))
        return None

    def _labels(self, token: str, execution_id: str) -> dict[str, str]:
        return {
            LABEL_PROJECT: PROJECT,
            LABEL_WORKER: self._worker_id,
            LABEL_EXECUTOR: self._name,
            LABEL_EXECUTION: execution_id,
            LABEL_ACTION: token,
            LABEL_CREATED: f"{time.time():.3f}",
        }

    async def _attach(self, run: _Run, command: Command, stop: StopSignal) -> RunOutcome | None:
        """Attach to the container's stdio before it starts, so nothing it writes is lost."""
        container_id = run.container_id
        assert container_id is not None
        sock = await self._daemon.call(
            lambda api: api.attach_socket(
                container_id,
                params={"stdout": 1, "stderr": 1, "stream": 1, "stdin": 1 if command.stdin else 0},
            )
        )
        run.streams = AttachedStreams(sock, loop=asyncio.get_running_loop(), name=run.token[:12])
        run.streams.start()
        if stop.reason is not None:
            return RunOutcome(status=stop.reason, message="stopped before the container started")
        return None

    async def _start(self, run: _Run, command: Command) -> RunOutcome | None:
        """Start the container; then watch for a stop and write stdin, each on its own task.

        Both run on their own, so a consumer slow to pull events delays neither. An outcome when
        the daemon could not execute argv[0]."""
        container_id, streams, stop = run.container_id, run.streams, run.stop
        assert container_id is not None and streams is not None and stop is not None
        run.started_at = time.time()
        try:
            await self._daemon.call(lambda api: api.start(container_id))
        except docker.errors.APIError as err:
            return self._start_failure(err, command, container_id)
        if self._pids_room() and self._cgroups is not None:
            cgroups, token = self._cgroups, run.token
            await self._after_runtime_init(lambda: cgroups.container_processes(token, container_id))
            self._limit_processes(token, container_id, exact_pids_max(command.limits, self._hardening))
        self._watch(run, command, streams, stop)
        return None

    def _watch(
        self, run: _Run, command: Command, streams: AttachedStreams | PipeStreams, stop: StopSignal
    ) -> None:
        """Once the command runs: act on a stop request, and write stdin, each on a task of its own."""
        run.stopper = asyncio.ensure_future(self._stop_on_request(run, stop))
        if command.stdin:
            run.stdin_task = asyncio.ensure_future(self._daemon.offload(streams.send_stdin, command.stdin))
            run.stdin_task.add_done_callback(_stdin_written)

    async def _stream(self, run: _Run) -> AsyncGenerator[LogChunk, None]:
        """The command's output as LogChunks, contiguous per stream, until it closes its output."""
        streams = run.streams
        assert streams is not None
        offsets = {LogStream.STDOUT: 0, LogStream.STDERR: 0}
        while (batch := await streams.next_batch()) is not None:
            for stream, data in batch:
                if stream is LogStream.STDERR and len(run.stderr_head) < _STDERR_HEAD:
                    run.stderr_head += data[: _STDERR_HEAD - len(run.stderr_head)]
                elif stream is LogStream.STDOUT and len(run.stdout_head) < _STDERR_HEAD:
                    run.stdout_head += data[: _STDERR_HEAD - len(run.stdout_head)]
                yield LogChunk(stream, offsets[stream], data)
                offsets[stream] += len(data)

    async def _wait(self, run: _Run) -> dict[str, Any]:
        """The container's inspected ``State`` once it has exited."""
        assert run.container_id is not None
        return await self._wait_for_exit(run, run.container_id)

    async def _collect(
        self, run: _Run, command: Command, stop: StopSignal, state: dict[str, Any]
    ) -> RunOutcome:
        """Read the action's cgroup, (archive I/O) copy outputs back, and word the outcome."""
        ended_at = time.time()
        container_id, streams = run.container_id, run.streams
        assert container_id is not None and streams is not None
        # A few small reads of the cgroup filesystem: quicker than a hop to a thread.
        if run.slot is not None and run.slot.counters is not None:
            reading = run.slot.counters.read()
        elif self._cgroups is not None:
            reading = self._cgroups.read(run.token)
            if run.oom_watch is not None:
                reading = CgroupReading(reading.usage, (reading.oom_kills or 0) + run.oom_watch.count())
        else:
            reading = CgroupReading(ResourceUsage(), None)
        over_limit = None
        if self._io_mode == "archive" and command.output_paths:
            try:
                await self._daemon.call(lambda api: self._collect_outputs(api, container_id, command))
            except OutputLimitExceeded as err:
                over_limit = str(err)
        outcome = self._outcome(
            run,
            command,
            stop,
            state=state,
            reading=reading,
            stderr_head=bytes(run.stderr_head),
            started_at=run.started_at,
            ended_at=ended_at,
            streams=streams,
        )
        run.dirty = outcome.status is not ExecutionStatus.COMPLETED or bool(reading.oom_kills)
        if over_limit is not None:  # an output limit replaces only a plain completion
            completed = outcome.status is ExecutionStatus.COMPLETED
            outcome = dataclasses.replace(
                outcome,
                status=ExecutionStatus.OUTPUT_LIMIT_EXCEEDED if completed else outcome.status,
                message=over_limit if completed else f"{outcome.message}; no outputs: {over_limit}",
            )
        return outcome

    def hold_output(self, stop: StopSignal) -> None:
        """Stop reading the output of the action run with ``stop`` until it ends.

        The daemon's copy then fills (log driver ``none``: it keeps no log of its own) and the
        command's next write blocks. Reading resumes, to the end of the output, when a stop is
        requested: the daemon completes a container's exit only once its output has been taken
        (until then even ``wait`` and ``inspect`` block), so a held container could not be seen
        to die. It also resumes when the container is seen to exit by itself, which the daemon
        reports while what the command left unread fits its buffers (about 1 MiB).
        """
        run = next((r for r in self._runs.values() if r.stop is stop), None)
        if run is None or run.streams is None or run.exit_watch is not None:
            return
        streams = run.streams
        streams.hold()
        run.exit_watch = asyncio.ensure_future(self._release_on_exit(run, streams))
        stop.on_request(lambda _reason: streams.release())

    async def _release_on_exit(self, run: _Run, streams: AttachedStreams | PipeStreams) -> None:
        try:
            # A failure here is met again, and reported, by the action's own wait after its output.
            with contextlib.suppress(Exception):
                if run.slot is not None:
                    await run.exited.wait()
                elif run.container_id is not None:
                    await self._wait_for_exit(run, run.container_id)
        finally:
            streams.release()

    async def _until_stopped(self, work: Awaitable[None], stop: StopSignal) -> bool:
        """``await work`` unless ``stop`` is requested first; False when stopped.

        Used for pulls only: they can take minutes, and a shared pull goes on for the other
        actions waiting on it (ImagePolicy shields it).
        """
        task = asyncio.ensure_future(work)
        waiter = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return False

    async def _create(
        self, body: dict[str, Any], image: str, run: _Run, command: Command, stop: StopSignal
    ) -> str | None:
        """Create the container; a missing image is pulled (``if-not-present``) or refused.

        None when ``stop`` came during a pull. The create call is kept in ``run.creating``: when
        the action is abandoned meanwhile, its thread still finishes the create, and ``_dispose``
        waits for it so that the container is removed, not left for a sweep.
        """
        name = f"expbuild-{run.token}"
        for attempt in (1, 2):
            try:
                run.creating = asyncio.ensure_future(
                    self._daemon.call(lambda api: api.create_container_from_config(body, name=name))
                )
                created: dict[str, Any] = await asyncio.shield(run.creating)
                return str(created["Id"])
            except docker.errors.ImageNotFound as err:
                if attempt == 2:
                    raise PreconditionError(
                        f"image {image!r} is not present on the engine after a pull"
                    ) from err
                if not await self._until_stopped(self._images.on_missing(image), stop):
                    return None
            except docker.errors.APIError as err:
                status = status_of(err) or 500
                if 400 <= status < 500:
                    raise PreconditionError(
                        f"docker engine refused a container for action {command.execution_id} "
                        f"(image {image!r}): {explain(err)}"
                    ) from err
                raise InternalError(
                    f"docker engine failed to create a container for action {command.execution_id}: "
                    f"{explain(err)}"
                ) from err
        raise AssertionError("unreachable")  # pragma: no cover

    def _put_root(self, api: Any, container_id: str, command: Command) -> None:
        """Archive I/O: copy the staged root into the container's work volume (blocking)."""
        with pack_root(
            command.root,
            arcname=posixpath.basename(ARCHIVE_ROOT),
            dir_owner=None if self._root_user else self._owner,
        ) as spool:
            api.put_archive(container_id, ARCHIVE_VOLUME, spool)

    def _collect_outputs(self, api: Any, container_id: str, command: Command) -> None:
        """Archive I/O: copy each output that exists in the container back under ``command.root``.

        What the container has replaces what was staged; an output the container does not
        have is removed. Nothing is ever written through a symlink.
        """
        budget = command.max_output_bytes
        # A path inside another listed output comes back with it: copied (and counted) once.
        for path in distinct_outputs(command.output_paths):
            try:
                chunks, _ = api.get_archive(container_id, posixpath.join(ARCHIVE_ROOT, path))
            except docker.errors.NotFound:
                clear_output(command.root, path)
                continue
            if not clear_output(command.root, path):
                _log.warning(
                    "action %s: output %s is under a symlink; not copied", command.execution_id, path
                )
                continue
            try:
                # Stops reading at the cap: a sparse terabyte in the container never reaches our disk.
                written = unpack_output(chunks, root=command.root, output_path=path, max_bytes=budget)
            except OutputLimitExceeded:
                for unpacked in command.output_paths:  # none is returned, rather than some cut short
                    clear_output(command.root, unpacked)
                raise
            except UnsafeArchiveError as err:
                raise InternalError(
                    f"action {command.execution_id}: output {path!r} of container {container_id[:12]}: {err}"
                ) from err
            if budget is not None:
                budget -= written

    def _memory_in_parent(self) -> bool:
        """Whether a cold container's memory limit goes on its per-action cgroup parent: on cgroup
        v1 with an engine that does not report OOM kills, so the worker sees them itself."""
        facts = self._facts
        return facts is not None and facts.cgroup_version == "1" and not facts.reports_oom_kills

    def _pids_room(self) -> int:
        """Room for the runtime's init under the PIDs limit, where the exact limit can be set once
        the command runs (the container's cgroup is ours to write); gVisor has its own room."""
        if self._cgroups is None or "runsc" in self._hardening.runtime:
            return 0
        return RUNTIME_INIT_PIDS

    async def _after_runtime_init(self, processes: Callable[[], Iterable[int]]) -> None:
        """Wait (a second at most) until none of ``processes`` is still runc's own init, which
        needs the PIDs room for its threads until it execs the command (keeping its pid)."""
        for _ in range(200):
            if not any(_is_runtime_init(pid) for pid in processes()):
                return
            await asyncio.sleep(0.005)

    def _limit_processes(self, token: str, container_id: str, count: int | None) -> None:
        """Set a running container's PIDs limit; when the cgroup refuses, the limit keeps its room."""
        if count is None or self._cgroups is None:
            return
        try:
            self._cgroups.limit_container_processes(token, container_id, count)
        except OSError as err:
            _log.warning(
                "could not set the process limit of container %s to %d: %s", container_id[:12], count, err
            )

    def _start_failure(self, err: docker.errors.APIError, command: Command, container_id: str) -> RunOutcome:
        message = explain(err)
        lowered = message.lower()
        if "exec" in lowered and any(
            s in lowered for s in ("not found", "no such file", "permission denied", "not a directory")
        ):
            return RunOutcome(
                status=ExecutionStatus.FAILED_TO_START,
                message=f"cannot execute {command.argv[0]!r} in container {container_id[:12]}: {message}",
            )
        raise InternalError(
            f"docker engine could not start container {container_id[:12]} for action "
            f"{command.execution_id}: {message}"
        ) from err

    async def _stop_on_request(self, run: _Run, stop: StopSignal) -> None:
        """On stop: SIGTERM (the init forwards it), then SIGKILL after the grace period."""
        await stop.wait()
        assert run.container_id is not None
        if run.slot is not None:
            await self._stop_exec(run, run.slot)
            return
        if not await self._kill(run.container_id, signal.SIGTERM):
            return
        run.killed = True
        try:
            await asyncio.wait_for(run.exited.wait(), self._config.kill_grace_seconds)
        except TimeoutError:
            run.escalated = True
            await self._kill(run.container_id, signal.SIGKILL)

    async def _kill(self, container_id: str, sig: signal.Signals) -> bool:
        """Send ``sig``; False when the container was no longer running."""
        try:
            await self._daemon.call(lambda api: api.kill(container_id, signal=sig.name))
        except docker.errors.APIError as err:
            if status_of(err) in (404, 409):
                return False
            raise
        return True

    async def _wait_for_exit(self, run: _Run, container_id: str) -> dict[str, Any]:
        """Wait for the container to stop and return its inspected ``State``."""

        def wait(api: Any) -> bool:
            try:
                api.wait(container_id, timeout=_WAIT_SLICE_SECONDS)
            except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as err:
                if "timed out" in str(err).lower():
                    return False
                raise
            return True

        try:
            while not await self._daemon.call(wait):
                pass
            run.exited.set()
            info: dict[str, Any] = await self._daemon.call(lambda api: api.inspect_container(container_id))
        except docker.errors.NotFound as err:
            if run.aborted:
                return {}
            raise InternalError(
                f"container {container_id[:12]} of action {run.execution_id} vanished while it ran"
            ) from err
        state: dict[str, Any] = info.get("State") or {}
        return state

    def _outcome(
        self,
        run: _Run,
        command: Command,
        stop: StopSignal,
        *,
        state: dict[str, Any],
        reading: CgroupReading,
        stderr_head: bytes,
        started_at: float,
        ended_at: float,
        streams: AttachedStreams | PipeStreams,
    ) -> RunOutcome:
        exit_code = state.get("ExitCode")
        exit_code = int(exit_code) if exit_code is not None else None
        notes: list[str] = []
        if state.get("Error"):
            notes.append(f"engine: {state['Error']}")
        if streams.error is not None:
            notes.append(f"log stream broke: {streams.error}")
        oom = bool(state.get("OOMKilled")) or bool(reading.oom_kills)
        status = ExecutionStatus.COMPLETED
        if oom:
            status = ExecutionStatus.OOM_KILLED
            limit = command.limits.memory_bytes
            notes.insert(
                0,
                "the kernel killed a process of the container for memory"
                + (f" (limit {limit} bytes, swap included)" if limit else ""),
            )
        elif run.aborted:
            status = ExecutionStatus.CANCELLED
            notes.insert(0, f"docker executor {self._name!r} closed while the command ran")
        elif run.killed and stop.reason is not None:
            status = stop.reason
            how = "SIGTERM, then SIGKILL" if run.escalated else "SIGTERM"
            notes.insert(0, f"stopped ({status.value}): the container got {how}")
        elif state.get("ExecFailed"):
            status = ExecutionStatus.FAILED_TO_START
            notes.insert(0, f"cannot execute {command.argv[0]!r}: the runtime could not start it")
        elif self._hardening.init and exit_code in (126, 127) and run.slot is None:
            match = _TINI_EXEC_FAILED.match(stderr_head)
            if match is not None and match.group(1) == command.argv[0].encode():  # not just any such line
                status = ExecutionStatus.FAILED_TO_START
                reason = match.group(2).decode(errors="replace")
                notes.insert(0, f"cannot execute {command.argv[0]!r}: {reason}")
        sig: int | None = None
        if status in _STOPPED and exit_code is not None and exit_code > 128:
            # Killed, not exited: the init reports 128 + the signal, as a shell would.
            sig = exit_code - 128
            exit_code = None
        if status is ExecutionStatus.COMPLETED and exit_code is not None and exit_code > 128:
            try:
                name = signal.Signals(exit_code - 128).name
            except ValueError:
                name = ""
            if name:
                notes.insert(0, f"exit code {exit_code}: most likely killed by {name}")
        return RunOutcome(
            status=status,
            exit_code=exit_code if status is not ExecutionStatus.FAILED_TO_START else None,
            signal=sig,
            message="; ".join(notes),
            usage=reading.usage,
            started_at=started_at,
            ended_at=ended_at,
        )

    # ---- the container pool ------------------------------------------------------------------------

    def _live_tokens(self) -> set[str]:
        live = set(self._runs) | self._making
        if self._pool is not None:
            live |= self._pool.tokens()
        return live

    def _room(self) -> int:
        """Containers the pool may still start: the capacity less what runs and what is idle."""
        if not self._capacity or self._pool is None:
            return 1 << 30
        return self._capacity - len(self._runs) - self._pool.idle_count()

    def _default_key(self) -> PoolKey:
        return PoolKey.of(self._config.image, self._hardening.network_mode, self._default_limits)

    def _sweep_mount_points(self) -> None:
        """Unmount and remove what a previous run left of the pool's mount points (blocking);
        the pool's directory goes too once empty."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self._pool_dir):
                token = entry.name.removesuffix(_AGENT_DIR_SUFFIX)
                if token in self._live_tokens():
                    continue
                if token != entry.name:  # an agent's directory: at most its socket inside
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    release_mount_point(Path(entry.path))
        with contextlib.suppress(OSError):
            os.rmdir(self._pool_dir)

    def _slot_alive(self, slot: Slot) -> bool:
        """The idle processes are all still in the container: nobody killed it from outside."""
        return (
            slot.counters is not None
            and slot.idle_pids <= slot.counters.procs()
            and (slot.agent is None or slot.agent.alive)
        )

    async def _make_slot(self, key: PoolKey) -> Slot | None:
        """Create and start one pool container of ``key`` running the idle command.

        Its /work is a bind of a mount point of its own, with ``rslave`` propagation: the action
        directory bound on that mount point later appears at /work inside. Its cgroup parent is
        per container, so its counters are its own. With the agent, the agent is its PID 1 (and
        its init) and connects back to a socket bound here before it started."""
        if self._cgroups is None or self._closed:
            return None
        token = uuid.uuid4().hex
        self._making.add(token)
        slot = Slot(token=token, key=key, mount_point=self._pool_dir / token)
        agent, listener = self._agent, None
        hardening = dataclasses.replace(self._hardening, init=False) if agent else self._hardening
        try:
            await self._daemon.offload(self._new_mount_point, slot.mount_point)
            if agent is not None:
                listener = await self._daemon.offload(self._agent_listener, token)
            placeholder = Command(
                execution_id="pool",
                argv=(
                    [f"{AGENT_MOUNT}/{AGENT_BINARY_NAME}", f"{AGENT_MOUNT}/ctl/{SOCKET_NAME}"]
                    if agent is not None
                    else self._config.pool.idle_command
                ),
                environment={},
                root=slot.mount_point,
                working_directory="",
                stdin=b"",
                limits=key.limits,
            )
            body = container_body(
                image=key.image,
                command=placeholder,
                hardening=hardening,
                network_mode=key.network_mode,
                labels={**self._labels(token, "pool"), LABEL_POOL: "idle"},
                io_mode="bind",
                cgroup_parent=self._cgroups.parent_for(token),
                pids_room=self._pids_room(),
            )
            body["HostConfig"]["Mounts"][0]["BindOptions"] = {"Propagation": "rslave"}
            if listener is not None:  # set exactly when there is an agent
                assert agent is not None
                body["HostConfig"]["Mounts"] += [
                    _read_only_bind(agent, f"{AGENT_MOUNT}/{AGENT_BINARY_NAME}"),
                    _read_only_bind(listener.directory, f"{AGENT_MOUNT}/ctl"),
                ]
            for flag in ("AttachStdout", "AttachStderr"):
                body[flag] = False
            created: dict[str, Any] = await self._daemon.call(
                lambda api: api.create_container_from_config(body, name=f"expbuild-{token}")
            )
            slot.container_id = cid = str(created["Id"])
            await self._daemon.call(lambda api: api.start(cid))
            info: dict[str, Any] = await self._daemon.call(lambda api: api.inspect_container(cid))
            state = info.get("State") or {}
            if not state.get("Running"):
                raise InternalError(
                    f"pool container {cid[:12]} of image {key.image!r} exited at once "
                    f"(exit code {state.get('ExitCode')}): "
                    + (
                        "its agent could not start"
                        if agent is not None
                        else f"does the image have {self._config.pool.idle_command[0]!r}?"
                    )
                )
            slot.init_pid = int(state.get("Pid") or 0)
            if listener is not None:
                slot.agent = await listener.accept(init_pid=slot.init_pid, within=_AGENT_CONNECT_SECONDS)
            mountinfo = self._mountinfo if self._mountinfo is not None else read_mountinfo()
            assert self._facts is not None
            slot.counters = ContainerCounters.locate(
                mountinfo=mountinfo,
                version=int(self._facts.cgroup_version),
                relative=f"{self._cgroups.parent_for(token)}/{cid}",
            )
            if slot.counters is None:
                raise InternalError(f"pool container {cid[:12]}: its cgroup is not readable here")
            expected = 2 if hardening.init else 1
            for _ in range(200):  # the init starts the idle command a moment after it starts
                slot.idle_pids = frozenset(slot.counters.procs())
                if len(slot.idle_pids) >= expected:
                    break
                await asyncio.sleep(0.005)
            # An action's processes are its own: the idle ones come on top of its limit.
            idle = len(slot.idle_pids) - (1 if hardening.init else 0)
            slot.pids_max = exact_pids_max(key.limits, hardening, idle=max(0, idle))
            self._loosen_processes(slot)
            return slot
        except BaseException:
            if listener is not None:
                listener.close()
            await self._discard_slot(slot)
            raise
        finally:
            self._making.discard(token)

    def _loosen_processes(self, slot: Slot) -> None:
        """Between actions a pool container's PIDs limit has room for the next exec's runtime init
        (the agent needs none: its limit is exact from the start)."""
        if slot.pids_max is not None:
            room = 0 if slot.agent is not None else self._pids_room()
            self._limit_processes(slot.token, slot.container_id, slot.pids_max + room)

    def _agent_dir(self, token: str) -> Path:
        """The slot's agent directory, beside its mount point (the sweep tells them by the suffix)."""
        return self._pool_dir / f"{token}{_AGENT_DIR_SUFFIX}"

    def _agent_listener(self, token: str) -> AgentListener:
        """A directory of the slot's own (mounted read-only at AGENT_MOUNT/ctl) with the socket in it."""
        directory = self._agent_dir(token)
        directory.mkdir(mode=0o755, parents=True)
        return AgentListener(directory)

    def _new_mount_point(self, path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        path.mkdir(mode=0o755)
        make_shared_mount_point(path)

    async def _discard_slot(self, slot: Slot) -> None:
        """Remove a pool container, its mount point and its cgroup; failures are left to the janitor."""
        self._making.add(slot.token)  # until removed, no sweep races this removal
        try:
            if slot.agent is not None:
                slot.agent.close()  # the agent exits, and the container with it
            with contextlib.suppress(OSError):
                os.rmdir(self._agent_dir(slot.token))
            if slot.container_id:
                await self._remove_quietly(slot.container_id)
            await self._daemon.offload(release_mount_point, slot.mount_point)
            if self._cgroups is not None:
                for delay in (0.0, 0.05, 0.2, 0.5):
                    if delay:
                        await asyncio.sleep(delay)
                    if self._cgroups.remove(slot.token):
                        break
        except Exception as err:
            _log.warning("could not discard pool container %s: %s", slot.container_id[:12], err)
        finally:
            self._making.discard(slot.token)

    def _lend(self, run: _Run, command: Command, image: str, network_mode: str) -> bool:
        """Take a pool container for ``run``, if the pool has one of its shape."""
        if self._pool is None or self._cgroups is None:
            return False
        asked = (
            command.recycle_runner or command.platform_properties.get(RECYCLE_PROPERTY, "").lower() == "true"
        )
        run.recycle = asked and self._hardening.readonly_rootfs
        slot = self._pool.take(PoolKey.of(image, network_mode, command.limits), recycled=run.recycle)
        if slot is None:
            return False
        run.slot, run.container_id = slot, slot.container_id
        return True

    async def _enter(self, run: _Run, command: Command) -> RunOutcome | None:
        """Run the command in the lent container by exec, its action directory bound at /work.

        The exec'd process gets what a cold container's command gets: the container's
        namespaces, cgroup, limits, seccomp profile, no capabilities, no new privileges, the
        configured user, exactly the request's environment (the container's own is empty but
        for what the engine adds to any container)."""
        slot, stop = run.slot, run.stop
        assert slot is not None and slot.counters is not None and stop is not None
        await self._daemon.offload(mount_bind, command.root, slot.mount_point)
        slot.uses += 1
        slot.counters.begin()
        if stop.reason is not None:
            return RunOutcome(status=stop.reason, message="stopped before the command started")
        root = root_in_container("bind")
        workdir = posixpath.join(root, command.working_directory) if command.working_directory else root
        if slot.agent is not None:
            return await self._enter_by_agent(run, command, slot, workdir)
        cid = slot.container_id

        def start(api: Any) -> tuple[str, Any]:
            created = api.exec_create(
                cid,
                list(command.argv),
                stdout=True,
                stderr=True,
                stdin=bool(command.stdin),
                user=self._hardening.user,
                environment=[f"{k}={v}" for k, v in command.environment.items()],
                workdir=workdir,
            )
            return str(created["Id"]), api.exec_start(created["Id"], socket=True)

        run.started_at = time.time()
        run.exec_id, sock = await self._daemon.call(start)
        run.streams = streams = AttachedStreams(sock, loop=asyncio.get_running_loop(), name=run.token[:12])
        streams.start()
        run.exec_pid = await self._exec_pid(run, slot)
        if self._pids_room() and run.exec_pid:
            exec_pid = run.exec_pid
            await self._after_runtime_init(lambda: [exec_pid])
            self._limit_processes(slot.token, cid, slot.pids_max)
        run.reaper = asyncio.ensure_future(self._reap(run, slot))
        self._watch(run, command, streams, stop)
        return None

    async def _enter_by_agent(
        self, run: _Run, command: Command, slot: Slot, workdir: str
    ) -> RunOutcome | None:
        """Start the command through the container's agent, on pipes of the worker's own.

        No engine call and no runtime start: the agent forks it inside the container, so it has
        what the agent has (namespaces, cgroup, seccomp, no capabilities, user). Its
        environment is the container's overlaid with the request's, as the engine does for an
        exec; so are the working directory and stdin (the null device when there is none)."""
        agent, stop = slot.agent, run.stop
        assert agent is not None and stop is not None
        pipes = CommandPipes.make(command.argv[0], stdin=command.stdin, user=None)
        in_r, out_w, err_w = pipes.child_ends
        if in_r == subprocess.DEVNULL:
            in_r = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            pipes.theirs.append(in_r)
        run.streams = streams = PipeStreams(
            stdout=pipes.out_r, stderr=pipes.err_r, stdin=pipes.in_w, loop=asyncio.get_running_loop()
        )
        streams.start()
        run.started_at = time.time()
        try:
            run.exec_pid, run.agent_exit = await agent.run(
                command.argv, command.environment, workdir, (in_r, out_w, err_w)
            )
        except CommandNotStarted as err:
            return RunOutcome(
                status=ExecutionStatus.FAILED_TO_START,
                message=f"cannot execute {command.argv[0]!r} in container {slot.container_id[:12]}: {err}",
            )
        except AgentLost as err:
            cid = slot.container_id[:12]
            raise InternalError(f"pool container {cid} cannot start commands: {err}") from err
        finally:
            for fd in pipes.theirs:
                os.close(fd)
        run.reaper = asyncio.ensure_future(self._reap(run, slot))
        self._watch(run, command, streams, stop)
        return None

    async def _exec_pid(self, run: _Run, slot: Slot) -> int:
        """The host pid of the exec'd command; 0 when it never ran or already ended.

        The engine answers the exec's start before the process exists, so this watches the
        container's cgroup for it: the one new process whose parent is outside the container
        (its children's parents are inside). The engine is asked now and then as well, which
        also tells a command that could not start."""
        counters = slot.counters
        assert counters is not None
        for attempt in range(2000):
            procs = counters.procs() - slot.idle_pids
            inside = procs | slot.idle_pids
            mains = [pid for pid in procs if _parent_of(pid) not in inside]
            if len(mains) == 1:
                return mains[0]
            if attempt % 25 == 24:
                info: dict[str, Any] = await self._daemon.call(lambda api: api.exec_inspect(run.exec_id))
                if info.get("Pid"):
                    return int(info["Pid"])
                if not info.get("Running") and info.get("ExitCode") is not None:
                    return 0
            await asyncio.sleep(0.001 if attempt < 100 else 0.01)
        return 0

    async def _reap(self, run: _Run, slot: Slot) -> None:
        """When the exec'd command exits, end what it left running, as a cold container's exit would.

        Its output then closes (a background process may hold it open otherwise)."""
        loop = asyncio.get_running_loop()
        if run.agent_exit is not None:
            # Shielded: the agent's report ends the command's turn even if this wait is cancelled;
            # its wait status (or why the agent went) stays in the future for _wait_exec.
            await asyncio.wait({asyncio.shield(run.agent_exit)})
        elif (fd := _pidfd(run.exec_pid)) >= 0:
            done: asyncio.Future[None] = loop.create_future()

            def exited() -> None:
                if not done.done():
                    done.set_result(None)

            loop.add_reader(fd, exited)
            try:
                await done
            finally:
                loop.remove_reader(fd)
                os.close(fd)
        assert slot.counters is not None
        await self._daemon.offload(slot.counters.kill_all_but, slot.idle_pids)
        run.exited.set()

    async def _wait_exec(self, run: _Run) -> dict[str, Any]:
        """The exec'd command's exit, as a ``State``-like dict: ExitCode, and ExecFailed when the
        runtime could not start argv[0] (its message then came unframed on the stream)."""
        await run.exited.wait()
        if run.slot is not None and run.agent_exit is not None:
            lost = run.agent_exit.exception()
            if lost is None:
                return {"ExitCode": exit_code(run.agent_exit.result())}
            if run.aborted:
                return {}
            raise InternalError(
                f"pool container {run.slot.container_id[:12]} of action {run.execution_id} stopped "
                f"while the command ran: {lost}"
            )
        info: dict[str, Any] = await self._daemon.call(lambda api: api.exec_inspect(run.exec_id))
        code = info.get("ExitCode")
        state: dict[str, Any] = {"ExitCode": code}
        if code in (126, 127) and run.stdout_head.startswith(b"OCI runtime exec failed"):
            state["ExecFailed"] = True
        return state

    async def _stop_exec(self, run: _Run, slot: Slot) -> None:
        """SIGTERM to the exec'd command, then SIGKILL to everything it started after the grace."""
        if run.exited.is_set():
            return
        if slot.agent is not None:
            slot.agent.signal(signal.SIGTERM)  # the agent signals only its child, never a reused pid
        elif run.exec_pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(run.exec_pid, signal.SIGTERM)
        else:
            return
        run.killed = True
        try:
            await asyncio.wait_for(run.exited.wait(), self._config.kill_grace_seconds)
        except TimeoutError:
            run.escalated = True
            assert slot.counters is not None
            await self._daemon.offload(slot.counters.kill_all_but, slot.idle_pids)

    async def _check_in(self, run: _Run, slot: Slot) -> None:
        """After the action: take its directory off /work; then a recycled container is cleaned and
        proven clean or removed, and a fresh one is removed."""
        assert self._pool is not None
        try:
            clean = await self._daemon.offload(self._clean, run, slot)
        except Exception as err:
            _log.warning("pool container %s failed its clean-up: %s", slot.container_id[:12], err)
            clean = False
        if clean and slot.agent is not None:
            changed = await slot.agent.check()
            if changed:
                _log.warning("pool container %s is not lent again: %s", slot.container_id[:12], changed)
                clean = False
        if clean and run.recycle and not run.dirty and not run.aborted and run.exec_pid:
            self._loosen_processes(slot)
            self._pool.give_back(slot)
        else:
            self._pool.retire(slot)

    def _clean(self, run: _Run, slot: Slot) -> bool:
        """Blocking: unmount the action directory; for a recycled container, kill every process
        but the idle ones, empty /tmp and /dev/shm, and check the idle processes are the same."""
        for _ in range(8):  # the action's bind, never the slot's own shared mount
            if mounts_at(slot.mount_point) <= 1 or not unmount(slot.mount_point):
                break
        if not run.recycle or run.dirty or slot.counters is None:
            return False
        if not slot.counters.kill_all_but(slot.idle_pids) or not self._slot_alive(slot):
            return False
        inside = Path(f"/proc/{slot.init_pid}/root")
        for scratch in ("tmp", "dev/shm"):
            if (inside / scratch).is_dir():
                empty_directory(inside / scratch)
        return slot.counters.procs() == set(slot.idle_pids) and not any(
            os.scandir(inside / "tmp") if (inside / "tmp").is_dir() else ()
        )

    # ---- cleanup ---------------------------------------------------------------------------------

    def _track(self, work: Awaitable[None]) -> asyncio.Future[None]:
        future = asyncio.ensure_future(work)
        self._cleanups.add(future)
        future.add_done_callback(self._cleanups.discard)
        return future

    async def _remove_quietly(self, container_id: str) -> None:
        try:
            await remove_container(self._daemon, container_id)
        except Exception as err:
            _log.warning("could not remove container %s: %s (the janitor will retry)", container_id[:12], err)

    async def _dispose(self, run: _Run) -> None:
        """Remove the container and the action's cgroup, then release its token."""
        if run.slot is not None:
            await self._check_in(run, run.slot)
            self._runs.pop(run.token, None)
            return
        try:
            if run.container_id is None and run.creating is not None:
                await asyncio.wait({run.creating})  # abandoned while the daemon created it
                if not run.creating.cancelled() and run.creating.exception() is None:
                    run.container_id = str(run.creating.result()["Id"])
            if run.container_id is not None:
                await self._remove_quietly(run.container_id)
            if self._cgroups is not None:
                for delay in (0.0, 0.05, 0.2, 0.5):
                    if delay:
                        await asyncio.sleep(delay)
                    if self._cgroups.remove(run.token):  # rmdir of empty cgroups: no I/O, no thread
                        break
        except Exception:
            _log.exception("cleanup of action %s failed (the janitor will retry)", run.execution_id)
        finally:
            self._runs.pop(run.token, None)


def _pidfd(pid: int) -> int:
    """A pidfd of ``pid``; -1 for no pid or one already gone."""
    try:
        return os.pidfd_open(pid) if pid else -1
    except ProcessLookupError:
        return -1


def _read_only_bind(source: Path, target: str) -> dict[str, Any]:
    return {"Type": "bind", "Source": str(source), "Target": target, "ReadOnly": True}


def _parent_of(pid: int) -> int:
    """A process's parent pid (0 when it is gone)."""
    fields = stat_fields(pid)
    try:
        return int(fields[PARENT]) if fields is not None else 0
    except (ValueError, IndexError):
        return 0


def _is_runtime_init(pid: int) -> bool:
    """Whether ``pid`` is still runc's init (its name until it execs the command)."""
    try:
        with open(f"/proc/{pid}/comm", "rb") as fh:
            return fh.read().startswith(b"runc:[")
    except OSError:
        return False


def _stdin_written(task: asyncio.Future[None]) -> None:
    """A command may exit without reading all its stdin; the broken pipe that leaves is no error."""
    if not task.cancelled() and task.exception() is not None:
        _log.debug("stdin not fully delivered: %s", task.exception())


def _reason(stop: StopSignal) -> ExecutionStatus:
    assert stop.reason is not None
    return stop.reason
