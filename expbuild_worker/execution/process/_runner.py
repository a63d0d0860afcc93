"""ProcessRunner: spawn, stream, wait and kill one command per action, in its own cgroup, as any user."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import itertools
import logging
import os
import resource
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from expbuild_worker.config import CgroupMode
from expbuild_worker.errors import ConfigError, InternalError, PreconditionError, UnavailableError
from expbuild_worker.execution.agent import bundled_agent, usable_agent
from expbuild_worker.execution.cgroups import (
    ActionCgroup,
    ActionCgroups,
    favors_dynamic_migrations,
    read_mountinfo,
)
from expbuild_worker.execution.executor import Command, StopSignal
from expbuild_worker.execution.proc_stat import START_TIME, stat_fields
from expbuild_worker.execution.process._helper_starter import HelperStarter
from expbuild_worker.execution.process._run import Run
from expbuild_worker.execution.process._spawn import (
    Rlimit,
    SpawnFailure,
    Starter,
    needs_full_fork,
    rlimit,
    spawn,
    started,
)
from expbuild_worker.execution.process._spawner import Spawner, SpawnerGone
from expbuild_worker.fs import directories
from expbuild_worker.model import (
    ExecutionStatus,
    ExecutorEvent,
    Readiness,
    ResourceLimit,
    ResourceLimits,
    RunOutcome,
    Started,
)

_log = logging.getLogger(__name__)


def _process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22); None if gone."""
    fields = stat_fields(pid)
    return fields[START_TIME].decode() if fields is not None and len(fields) > START_TIME else None


_STARTED = _process_start(os.getpid())
_OWNER = f"{os.getpid()}.{_STARTED}" if _STARTED else str(os.getpid())
_TOKENS = itertools.count(1)
"""Action cgroup names are ``<worker pid>.<its start time>-<n>``: unique in this process, and a
later run can tell whose owner is gone (only those are swept), even when it has the same pid as a
crashed predecessor or the pid went to an unrelated process since."""

SPARE_CGROUPS = 16
"""Action cgroups made ahead of need, each with a placed child (the starter's) already waiting
in it. Creating one (two or three v1 directories) takes ~0.12 ms and a child's start with its
cgroup migration ~1-20 ms, which would otherwise be on an action's path."""

SPARE_CGROUPS_LOW = 4
"""The spares are topped up to SPARE_CGROUPS once no more than this many are left, all at once:
on cgroup v1 (without ``favordynmods``) each placed child's migration stalls every fork and exit
on the machine, the next commands' too, for up to an RCU grace period, and migrations in a burst
share one. Topped up one by one after every action, the spares cost a sequential client ~0.46 ms
per action; in bursts of twelve, ~0.2 ms less in the same run."""

MAX_IDLE_CGROUPS = 2 * SPARE_CGROUPS
"""Reused cgroups are kept while fewer than this many cgroups wait for an action; more are removed."""

UID_WAIT_SECONDS = 5.0
"""How long an action waits for a uid of ``run_as_uids`` that its predecessor still holds."""

_REMOVE_DELAYS = (0.01, 0.05, 0.2, 1.0, 5.0, 30.0)
"""Seconds between attempts to remove an action cgroup whose SIGKILLed processes have not exited yet."""

_CGROUP_MODES = ("auto", "off", "required")


@dataclass(frozen=True, slots=True)
class Launch:
    """What to spawn for a command: the process's argv, the file to exec and its working directory."""

    argv: Sequence[str]
    executable: str
    cwd: Path


class Launcher(Protocol):
    """The hook by which executors on this runner differ: how a command becomes a process.

    The host launcher runs argv as it is; the sandbox launcher wraps it in bubblewrap, with
    argv[0] resolved inside the sandbox's view of the file system.
    """

    own_processes: int
    """Processes of the launcher's own around the command (a sandbox's monitor and init): the
    action's cgroup allows them on top of ``max_processes``, which is the command's."""

    def unenforceable(self, limits: ResourceLimits) -> str:
        """The first limit (other than processes, which the runner judges) this launcher cannot
        honour, as ``field=value (why)``; '' if none."""
        ...

    def unavailable(self, limits: ResourceLimits) -> str:
        """What in ``limits`` this launcher cannot give at all (e.g. network access where none is
        allowed), as ``field=value (why)``; refused whatever ``refuse_unenforceable_limits`` says."""
        ...

    def launch(self, command: Command, cwd: Path) -> Launch:
        """The process for ``command`` whose working directory on the host is ``cwd``; raises
        SpawnFailure (the outcome is FAILED_TO_START) when it cannot run, e.g. argv[0] is missing."""
        ...


@dataclass(frozen=True, slots=True)
class _Limits:
    """An action's limits after defaults and maximums: what must be enforced, None = no limit."""

    memory_bytes: int | None
    max_processes: int | None


class ProcessRunner:
    """Runs one command per action as a child process of the worker, shared by the host and
    sandbox executors (which differ only by their ``Launcher``).

    The process gets exactly its command's environment, its own session and process group
    (killed as a whole when the command ends or is stopped) and, with cgroups (``cgroups`` =
    "auto" where this process can create them, or "required"), its own cgroup
    ``<hierarchy>/<cgroup_parent>/<worker>/<name>/<token>``, made ahead of need while earlier
    commands run (unused, its limits written when taken). The cgroup gives true usage (peak
    memory and CPU time of every process of the action), a memory limit the kernel enforces by
    OOM-killing (reported as OOM_KILLED), a process limit (``pids.max``, binding root too), and
    finds processes that left the process group (setsid): everything still in it is SIGKILLed
    when the command ends, then it is removed. The command is in its cgroup from its first
    instruction: with a limit, the forked child enters it before exec (a full fork, ~1.5 ms
    more here, as rlimits always cost); without (stats only, cgroup v1), the spawning thread
    steps into the cgroup for the fast vfork spawn and back out, so the child is born inside
    (moving it in after the spawn would race it: it often runs and forks first). On cgroup v2,
    which cannot move one thread, every command takes the fork path. Without cgroups, limits
    are RLIMIT_AS / RLIMIT_NPROC and a process that calls setsid escapes the kill.
    """

    def __init__(
        self,
        *,
        kind: str,
        name: str,
        launcher: Launcher,
        kill_grace_seconds: float,
        refuse_unenforceable_limits: bool,
        default_limits: ResourceLimits,
        max_limits: ResourceLimits,
        cgroups: CgroupMode = "auto",
        cgroup_parent: str = "expbuild",
        worker_id: str = "local",
        mountinfo: str | None = None,
        run_as: tuple[int, int] | None = None,
        run_as_uids: range | None = None,
        reuse_cgroups: bool = True,
    ) -> None:
        """``kind`` names the executor in messages ("host", "sandbox"); ``worker_id`` names this
        worker's cgroup directory; ``mountinfo`` replaces ``/proc/self/mountinfo`` (tests).
        Cgroups are set up by ``start`` (or the first use). ``run_as`` (uid, gid) runs every
        process as that unprivileged user (a root worker's safe default): the action directory's
        directories are handed to it, the inputs stay the worker's and read-only to it, and it
        cannot leave its cgroup or touch the worker. ``run_as_uids`` instead gives each running
        action a uid of its own from the range (its gid the same number), taken back once every
        process of the action is gone, so concurrent actions cannot signal each other or enter
        each other's directories. ``reuse_cgroups`` (cgroup v1 with the native helper) keeps
        each action cgroup, with a resident helper in it, for a later action once it is proven
        clean (see ``ActionCgroups.recycle``) instead of removing it."""
        if kill_grace_seconds <= 0:
            raise ConfigError(
                f"executor {name!r}: kill_grace_seconds must be positive, got {kill_grace_seconds}"
            )
        if any(part in (".", "..") for part in cgroup_parent.split("/")):
            raise ConfigError(
                f"executor {name!r}: cgroup_parent must not contain '.' or '..', got {cgroup_parent!r}"
            )
        if cgroups not in _CGROUP_MODES:
            raise ConfigError(
                f"executor {name!r}: cgroups must be one of {list(_CGROUP_MODES)}, got {cgroups!r}"
            )
        self._kind = kind
        self._name = name
        self._launcher = launcher
        self._grace = kill_grace_seconds
        self._refuse = refuse_unenforceable_limits
        self._default_limits = default_limits
        self._max_limits = max_limits
        self._cgroup_mode = cgroups
        self._cgroup_parent = cgroup_parent
        self._worker_id = worker_id
        self._mountinfo = mountinfo
        self._cgroups: ActionCgroups | None = None
        self.cgroup_state = "off (configured)" if cgroups == "off" else "not set up yet"
        self.cgroup_migrations = "none (no per-action cgroups)"
        """What the executor's capabilities say about cgroups, and why."""
        self._cgroup_error: PreconditionError | None = None
        self._activated = False
        self._leftovers: dict[str, ActionCgroup] = {}
        # Made ahead, no limit set, nothing ever ran in them; taken oldest first (its placed child
        # is the likeliest to be there already).
        self._spare_cgroups: collections.deque[ActionCgroup] = collections.deque()
        self._placed: set[str] = set()  # spares the starter has a child waiting in
        self._reuse_wanted = reuse_cgroups
        self._reuse = False  # decided once the cgroups are found (v1 and a resident helper)
        self._housekeeping = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-cgroups")
        self._spares_scheduled = False
        self._spares_making: asyncio.Future[list[ActionCgroup]] | None = None
        if run_as_uids is not None and len(run_as_uids) == 0:
            raise ConfigError(f"executor {name!r}: run_as_uids is empty")
        self._uids = run_as_uids
        self._free_uids = collections.deque(run_as_uids or ())
        self._held_uids: dict[str, int] = {}  # action cgroup token -> the uid it gives back once removed
        self._uid_freed = asyncio.Event()
        self.run_as = (run_as_uids[0], run_as_uids[0]) if run_as_uids else run_as
        """The action user (with ``run_as_uids``, the first of the range, for checks and probes)."""
        self.root = (os.geteuid() == 0 or os.getuid() == 0) and self.run_as is None
        """Whether processes run as root (limits that do not bind root are then not enforced)."""
        self._runs: dict[StopSignal, Run] = {}
        helper = _native_helper()
        self._starter: Starter = (
            HelperStarter(helper, resident=reuse_cgroups) if helper is not None else Spawner(name=name)
        )
        self.closed = False
        # Whether processes can be limited is known once cgroups are set up; checked again then.
        self._check_default_limits(processes=cgroups == "off")

    async def start(self) -> None:
        """Set up cgroups (raising PreconditionError when "required" and impossible) and remove the
        action cgroups a previous run of this worker and executor left behind, killing what runs
        there; waits a little for those processes to exit."""
        self.activate()
        await self._remove_leftovers()
        if self.run_as is not None or self._cgroups is not None:
            # Every command is started by the starter then, or execs in a child it placed in a
            # spare cgroup ahead of need: start it now.
            self._starter.start()
        making = self._make_spare_cgroups()
        if making is not None:  # shielded: a cancelled start still lets close() wait for them
            await asyncio.shield(making)  # the first spares are there (children being placed)

    @property
    def starter(self) -> Starter:
        """What starts the commands needing a cgroup, user switch or rlimits applied before exec,
        so the worker itself never forks: the native helper, else the spawner process."""
        return self._starter

    @property
    def cgroups(self) -> ActionCgroups | None:
        return self._cgroups

    def activate(self) -> None:
        """Find and prepare this executor's cgroups once; "auto" falls back to rlimits when it cannot."""
        if self._cgroup_error is not None:
            raise self._cgroup_error
        if self._activated:
            return
        if self._cgroup_mode != "off":
            mountinfo = self._mountinfo if self._mountinfo is not None else read_mountinfo()
            try:
                self._cgroups = ActionCgroups.for_host(
                    mountinfo=mountinfo,
                    parent=self._cgroup_parent,
                    worker_id=self._worker_id,
                    executor=self._name,
                )
            except PreconditionError as err:
                if self._cgroup_mode == "required":
                    self._cgroup_error = PreconditionError(
                        f'{self._kind} executor {self._name!r}: cgroups = "required" but {err}'
                    )
                    raise self._cgroup_error from err
                self.cgroup_state = f"unavailable ({err}); limits are rlimits"
            else:
                cg = self._cgroups
                controllers = "memory, pids and cpu" if cg.version == 2 else "memory, cpuacct and pids"
                self._reuse = self._reuse_wanted and cg.version == 1 and self._starter.resident
                reuse = (
                    ", each reused once proven clean (a resident helper in it starts its commands)"
                    if self._reuse
                    else ""
                )
                self.cgroup_state = (
                    f"v{cg.version}: one cgroup per running action ({controllers}) under {cg.base}{reuse}"
                )
                if favors_dynamic_migrations(mountinfo):
                    self.cgroup_migrations = "cheap (a cgroup hierarchy is mounted with favordynmods)"
                else:
                    self.cgroup_migrations = (
                        "slow after a pause (no cgroup hierarchy is mounted with favordynmods: a move "
                        "into a cgroup waits for an RCU grace period; spare cgroups with a child placed "
                        "ahead keep it off most actions' paths)"
                    )
                    _log.info(
                        "%s executor %r: cgroup migrations %s; see 'favordynmods' in docs/deployment.md",
                        self._kind,
                        self._name,
                        self.cgroup_migrations,
                    )
                for leaf in cg.stale(owner_alive):  # a previous run's: kill what runs there, remove
                    leaf.kill()
                    self._dispose(leaf)
        if not self._reuse:
            self._starter.resident = False  # no cgroup to stay in between commands
        self._activated = True
        self._check_default_limits(processes=True)

    def _check_default_limits(self, *, processes: bool) -> None:
        if self._refuse:
            problem = self._unenforceable(self._default_limits, processes=processes)
            if problem:
                raise ConfigError(
                    f"executor {self._name!r}: default_limits.{problem} cannot be enforced by a "
                    f"{self._kind} executor while refuse_unenforceable_limits is true"
                )

    # ---- what is enforced -----------------------------------------------------------------

    def enforced(self) -> tuple[set[ResourceLimit], dict[str, str]]:
        """Of MEMORY, PROCESSES and TIMEOUT, which this runner enforces (the rest is the
        launcher's to say), with ``details`` describing user, cgroups, memory and processes.

        With cgroups, MEMORY is the cgroup's memory limit and PROCESSES its ``pids.max`` (root
        included). Without, MEMORY is RLIMIT_AS (address space, which a root process could raise
        again) and PROCESSES is RLIMIT_NPROC, which does not bind root.
        """
        self.activate()
        cg = self._cgroups
        enforced = {ResourceLimit.MEMORY, ResourceLimit.TIMEOUT}
        if self._cgroup_pids or not self.root:
            enforced.add(ResourceLimit.PROCESSES)
        if cg is not None:
            memory = "cgroup memory limit of the whole action" + (
                ", swap included" if cg.limits_swap else " (swap not limited: no swap accounting)"
            )
        else:
            memory = "RLIMIT_AS (address space) of each process" + (
                "; a command running as root can raise it" if self.root else ""
            )
        if self._cgroup_pids:
            processes = "cgroup pids.max of the whole action"
        elif self.root:
            processes = "not enforced: RLIMIT_NPROC does not apply to root"
        else:
            processes = "RLIMIT_NPROC (counts every process of the worker's user)"
        details = {
            "euid": (
                f"{self._uids[0]}-{self._uids[-1]}"
                if self._uids
                else str(self.run_as[0] if self.run_as is not None else os.geteuid())
            ),
            "user": (
                f"each running command has a uid of its own, {self._uids[0]}-{self._uids[-1]} (gid = uid)"
                if self._uids
                else f"commands run as uid {self.run_as[0]}, gid {self.run_as[1]}"
                if self.run_as is not None
                else ("commands run as root (run_as_root)" if self.root else "the worker's own user")
            ),
            "cgroups": self.cgroup_state,
            "cgroup_migrations": self.cgroup_migrations,
            "memory": memory,
            "processes": processes,
        }
        return enforced, details

    def readiness(self) -> Readiness:
        """Not ready once closed, or on a platform without ``pidfd_open``; the launcher's own
        checks come after."""
        if self.closed:
            return Readiness(False, f"{self._kind} executor {self._name!r} is closed")
        if not hasattr(os, "pidfd_open"):
            return Readiness(False, "this platform has no pidfd_open (Linux 5.3 or later is needed)")
        return Readiness(True)

    def check(self, limits: ResourceLimits) -> None:
        """Refuses what ``execute`` would: a limit this runner and its launcher cannot enforce
        while ``refuse_unenforceable_limits`` is set."""
        self.activate()
        self._refuse_unenforceable(limits)

    # ---- running ------------------------------------------------------------------------

    async def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        """Run ``command``: Started, LogChunks as it writes, then one RunOutcome.

        Raises PreconditionError (before spawning) for limits this executor refuses, and
        UnavailableError once closed. A command that cannot start ends with FAILED_TO_START.
        """
        if self.closed:
            raise UnavailableError(f"{self._kind} executor {self._name!r} is closed")
        self.activate()
        limits = self._limits(command)
        rlimits = self._rlimits(limits)
        if stop.reason is not None:
            yield RunOutcome(status=stop.reason, message="stopped before the command started")
            return
        user = await self._take_user()
        leaf: ActionCgroup | None = None
        try:
            launch = self._launcher.launch(command, command.root / command.working_directory)
            join: tuple[str, ...] = ()
            born_inside: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
            if self._cgroups is not None:
                pids_max = (
                    limits.max_processes + self._launcher.own_processes + (1 if self._reuse else 0)
                    if self._cgroup_pids and limits.max_processes is not None
                    else None
                )  # with reuse, the resident helper is one more process in the cgroup
                leaf, placed = self._action_cgroup(
                    self._cgroups, memory_bytes=limits.memory_bytes, max_processes=pids_max
                )
                vfork = (
                    not needs_full_fork(user, rlimits) and limits.memory_bytes is None and pids_max is None
                )
                if vfork and self._cgroups.moves_threads and not placed and not self._reuse:
                    born_inside = self._cgroups.spawning_into(leaf)  # keeps the fast vfork spawn
                else:
                    join = leaf.procs  # the starter's child enters before exec
            if user is not None:
                await _hand_over(command.root, user, () if self._starter.joins_as_root else join)
            # Inside born_inside this thread is in the action's cgroup: spawn then spawns
            # here, by vfork, without ever yielding to the event loop.
            with born_inside:
                child = await spawn(
                    argv=launch.argv,
                    executable=launch.executable,
                    cwd=launch.cwd,
                    working_directory=command.working_directory,
                    environment=command.environment,
                    stdin=command.stdin,
                    rlimits=rlimits,
                    join=join,
                    user=user,
                    starter=self._starter,
                )
            await started(
                child,
                argv0=launch.argv[0],
                cwd=launch.cwd,
                working_directory=command.working_directory,
            )
            if leaf is not None:  # its helper (maybe a new one) is never killed or counted as the action's
                self._note_resident(leaf)
        except SpawnFailure as failure:
            self._dispose(leaf)
            self._give_back(user, leaf)
            yield RunOutcome(status=ExecutionStatus.FAILED_TO_START, message=str(failure))
            return
        except BaseException:
            self._dispose(leaf)
            self._give_back(user, leaf)
            raise
        run = Run(
            child=child,
            stdin=command.stdin,
            kill_grace_seconds=self._grace,
            cgroup=leaf,
            memory_limit=limits.memory_bytes if leaf is not None else None,
        )
        self._runs[stop] = run
        forget_stop: Callable[[], None] | None = None
        try:
            run.start()
            if self.closed:  # close() came while the command was being started: it ends it too
                run.abort(
                    ExecutionStatus.CANCELLED,
                    f"{self._kind} executor {self._name!r} closed while the command started",
                )
            # Acted on in a callback, so a consumer that is slow to pull events cannot delay the kill.
            forget_stop = stop.on_request(run.request_stop)
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
            await run.cgroup_emptied()
            yield run.outcome()
        finally:
            if forget_stop is not None:
                forget_stop()
            run.release()
            self._runs.pop(stop, None)
            self._retire(leaf, user)
            # Here, not before the outcome: the engine closes this generator once its report is
            # on its way, so making the next spares (~0.25 ms) does not delay that report.
            self._schedule_spares()

    def hold_output(self, stop: StopSignal) -> None:
        """Stop reading the output of the command run with ``stop`` until it exits (by itself or
        by a stop): once its pipes are full, its writes block."""
        run = self._runs.get(stop)
        if run is not None:
            run.hold_output()

    async def close(self) -> None:
        """Kill (SIGKILL) and reap every command still running, remove the cgroups; idempotent."""
        self.closed = True
        for run in list(self._runs.values()):
            run.abort(
                ExecutionStatus.CANCELLED,
                f"{self._kind} executor {self._name!r} closed while the command ran",
            )
        self._starter.close()  # its placed children end with it
        if self._spares_making is not None:  # spares being made: disposed once made (its callback
            with contextlib.suppress(Exception):  # runs before this resumes: registered first)
                await asyncio.shield(self._spares_making)
        while self._spare_cgroups:
            self._dispose(self._spare_cgroups.pop())
        await self._remove_leftovers()
        self._housekeeping.shutdown(wait=False)
        if self._cgroups is not None:
            self._cgroups.remove_base()

    @property
    def _cgroup_pids(self) -> bool:
        """Whether each action's cgroup carries its process limit (``pids.max``)."""
        return self._cgroups is not None and self._cgroups.enforces_processes

    # ---- action users ---------------------------------------------------------------------------

    async def _take_user(self) -> tuple[int, int] | None:
        """The (uid, gid) the next command runs as: its own from ``run_as_uids``, else ``run_as``.

        An action's uid comes back once its cgroup is removed, a moment after the action's slot
        is free: a new action waits for one (UID_WAIT_SECONDS at most, then UNAVAILABLE)."""
        if self._uids is None:
            return self.run_as
        loop = asyncio.get_running_loop()
        deadline = loop.time() + UID_WAIT_SECONDS
        while not self._free_uids:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise UnavailableError(
                    f"{self._kind} executor {self._name!r}: every uid of its range "
                    f"{self._uids[0]}-{self._uids[-1]} belongs to an action still running or ending"
                )
            self._uid_freed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._uid_freed.wait(), remaining)
        uid = self._free_uids.popleft()
        return uid, uid

    def _free_uid(self, uid: int) -> None:
        self._free_uids.append(uid)
        self._uid_freed.set()

    def _give_back(self, user: tuple[int, int] | None, leaf: ActionCgroup | None) -> None:
        """Return an action's own uid once nothing of the action runs: now, or (while its cgroup
        is still busy with SIGKILLed processes) when that cgroup is removed."""
        if self._uids is None or user is None:
            return
        if leaf is not None and leaf.token in self._leftovers:
            self._held_uids[leaf.token] = user[0]
        else:
            self._free_uid(user[0])

    def _forget_leftover(self, token: str) -> None:
        """An action cgroup is gone: forget it, and free the uid it held back."""
        self._leftovers.pop(token, None)
        uid = self._held_uids.pop(token, None)
        if uid is not None:
            self._free_uid(uid)

    # ---- cgroup creation and removal ------------------------------------------------------------

    def _action_cgroup(
        self, cgroups: ActionCgroups, *, memory_bytes: int | None, max_processes: int | None
    ) -> tuple[ActionCgroup, bool]:
        """A cgroup for one action with its limits set, and whether the starter has a child placed
        in it (then the command must be spawned there, joining it): a spare when there is one (a
        reused one first), else a new one. Schedules making the next spares."""
        if not self._spare_cgroups:
            self._schedule_spares()
            leaf = cgroups.create(new_token(), memory_bytes=memory_bytes, max_processes=max_processes)
            return leaf, False
        leaf = self._spare_cgroups.popleft()
        placed = leaf.token in self._placed
        self._placed.discard(leaf.token)
        try:
            cgroups.set_limits(leaf, memory_bytes=memory_bytes, max_processes=max_processes)
        except InternalError:
            # v1 refuses a memory limit below what the cgroup already holds (EBUSY): a tiny
            # limit gets a new, empty cgroup, whose own failure is reported.
            self._dispose(leaf)
            leaf = cgroups.create(new_token(), memory_bytes=memory_bytes, max_processes=max_processes)
            return leaf, False
        except BaseException:
            self._dispose(leaf)
            raise
        return leaf, placed

    def _schedule_spares(self) -> None:
        """Top the spares up soon, once no more than SPARE_CGROUPS_LOW are left: once a command
        has ended (or when none is left), because on cgroup v1 a placed child's migration holds
        up every fork and exit on the machine for an RCU grace period, a running command's too."""
        if len(self._spare_cgroups) > SPARE_CGROUPS_LOW:
            return
        if not self._spares_scheduled:
            self._spares_scheduled = True
            asyncio.get_running_loop().call_soon(self._make_spare_cgroups)

    def _make_spare_cgroups(self) -> asyncio.Future[list[ActionCgroup]] | None:
        """Top the spares up to SPARE_CGROUPS, each with a child placed in it ahead of need when the
        starter runs (so neither a fork nor a cgroup migration is on the next command's path: on
        cgroup v1 a migration after a pause waits for an RCU grace period, several ms). The
        directories are made on the housekeeping thread (a dozen v1 cgroups take ~1 ms that the
        event loop would be held for), the children placed once they are there. A failure is
        logged and left to the next action's own creation, which reports it."""
        cgroups = self._cgroups
        wanted = SPARE_CGROUPS - len(self._spare_cgroups)
        if self._spares_making is not None:
            return self._spares_making
        if cgroups is None or self.closed or wanted <= 0:
            self._spares_scheduled = False
            return None
        try:
            making = asyncio.get_running_loop().run_in_executor(
                self._housekeeping, self._create_spares, cgroups, wanted
            )
        except RuntimeError:  # no running loop, or the thread is shut down: make them here
            self._spares_made(self._create_spares(cgroups, wanted))
            return None
        self._spares_making = making
        making.add_done_callback(self._spares_done)
        return making

    def _spares_done(self, making: asyncio.Future[list[ActionCgroup]]) -> None:
        self._spares_making = None
        if making.cancelled() or making.exception() is not None:  # _create_spares returns what it made
            self._spares_scheduled = False
            return
        self._spares_made(making.result())

    def _create_spares(self, cgroups: ActionCgroups, count: int) -> list[ActionCgroup]:
        made: list[ActionCgroup] = []
        try:
            for _ in range(count):
                made.append(
                    cgroups.create(
                        new_token(), memory_bytes=None, max_processes=None, pids=cgroups.enforces_processes
                    )
                )
        except InternalError as err:
            _log.warning("%s executor %r: could not make a spare cgroup: %s", self._kind, self._name, err)
        except Exception:
            _log.exception("%s executor %r: making spare cgroups failed", self._kind, self._name)
        return made

    def _spares_made(self, made: list[ActionCgroup]) -> None:
        self._spares_scheduled = False
        if self.closed:
            for leaf in made:
                self._dispose(leaf)
            return
        self._spare_cgroups.extend(made)
        try:
            self._starter.place([leaf.procs for leaf in made])  # placed while the worker goes on
        except SpawnerGone as err:
            _log.warning("%s executor %r: could not place a child ahead: %s", self._kind, self._name, err)
            return
        if self._starter.alive():
            self._placed.update(leaf.token for leaf in made)

    async def _remove_leftovers(self) -> None:
        """Kill and remove the action cgroups still waiting for their processes, for at most ~1.3 s."""
        for delay in (0.0, *_REMOVE_DELAYS[:4]):
            if not self._leftovers:
                return
            await asyncio.sleep(delay)
            for token, leaf in list(self._leftovers.items()):
                self._kill_leftover(leaf)
                if _remove_quietly(leaf):
                    self._forget_leftover(token)
        for leaf in self._leftovers.values():
            _log.warning("cgroup %s of executor %r is still busy", leaf.dirs[0], self._name)

    def _retire(self, leaf: ActionCgroup | None, user: tuple[int, int] | None) -> None:
        """At an action's end: on a thread, check its cgroup for reuse (with a resident helper) or
        remove it, then free its uid. On cgroup v1 an rmdir of three directories costs 0.1-1 ms of
        kernel time under load, which would stall the event loop; until it is done the cgroup
        counts as a leftover (its uid stays held)."""
        if leaf is None:
            self._give_back(user, None)
            return
        self._leftovers[leaf.token] = leaf
        self._give_back(user, leaf)
        cgroups = self._cgroups
        try:
            if leaf.resident and cgroups is not None and not self.closed:
                check = asyncio.get_running_loop().run_in_executor(self._housekeeping, cgroups.recycle, leaf)
                check.add_done_callback(functools.partial(self._recycled, leaf))
                return
            removal = asyncio.get_running_loop().run_in_executor(self._housekeeping, _remove_quietly, leaf)
        except RuntimeError:  # no running loop, or closed: remove it here
            self._dispose(leaf)
            return
        removal.add_done_callback(functools.partial(self._retired, leaf))

    def _recycled(self, leaf: ActionCgroup, check: asyncio.Future[str]) -> None:
        """A used cgroup was checked for reuse: back to the spares (first in line, its helper
        waiting) when clean, else removed with its helper. Either way its uid is free again."""
        if leaf.token not in self._leftovers:  # close() removed it meanwhile
            return
        problem = "the check failed" if check.cancelled() or check.exception() is not None else check.result()
        if problem or self.closed or len(self._spare_cgroups) >= MAX_IDLE_CGROUPS:
            if problem:
                _log.debug("cgroup %s is not reused: %s", leaf.token, problem)
            self._dispose(leaf)
            return
        self._forget_leftover(leaf.token)
        self._spare_cgroups.appendleft(leaf)
        self._placed.add(leaf.token)

    def _retired(self, leaf: ActionCgroup, removal: asyncio.Future[bool]) -> None:
        if leaf.token not in self._leftovers:  # close() removed it meanwhile
            return
        if not removal.cancelled() and removal.exception() is None and removal.result():
            self._forget_leftover(leaf.token)
        else:
            self._dispose(leaf)  # still busy: kill what is left, retry later

    def _note_resident(self, leaf: ActionCgroup) -> None:
        """Note which helper lives in ``leaf`` now, for its kill and checks to spare: the one
        waiting there, or one kept until the start it is making is over; never a pid a helper
        had before."""
        if self._reuse:
            leaf.resident = self._starter.resident_pid(leaf.procs) or 0

    def _kill_leftover(self, leaf: ActionCgroup) -> None:
        """SIGKILL what is in a cgroup being let go, sparing only a helper still alive there."""
        self._note_resident(leaf)
        leaf.kill()

    def _dispose(self, leaf: ActionCgroup | None, attempt: int = 0) -> None:
        """Remove an action's cgroup now, or (while SIGKILLed processes are still exiting) a little later."""
        if leaf is None:
            return
        if attempt == 0:
            self._starter.forget(leaf.procs)  # a child still placed there (its action never used it)
        if _remove_quietly(leaf):
            self._forget_leftover(leaf.token)
            return
        self._kill_leftover(leaf)
        self._leftovers[leaf.token] = leaf
        if attempt < len(_REMOVE_DELAYS):
            with contextlib.suppress(RuntimeError):  # no running loop: close() or the next start removes it
                loop = asyncio.get_running_loop()
                loop.call_later(_REMOVE_DELAYS[attempt], self._dispose, leaf, attempt + 1)
        else:
            _log.warning(
                "cgroup %s of executor %r is still busy; close() or the next start removes it",
                leaf.dirs[0],
                self._name,
            )

    # ---- limits ---------------------------------------------------------------------------

    def _unenforceable(self, limits: ResourceLimits, *, processes: bool = True) -> str:
        """The first limit in ``limits`` this executor cannot honour, as ``field=value``; '' if none.

        ``processes``: whether to judge the process limit yet (it depends on the cgroups found).
        """
        problem = self._launcher.unenforceable(limits)
        if problem:
            return problem
        if processes and limits.max_processes is not None and self.root and not self._cgroup_pids:
            return f"max_processes={limits.max_processes} (RLIMIT_NPROC does not apply to root)"
        return ""

    def _refuse_unenforceable(self, limits: ResourceLimits) -> None:
        missing = self._launcher.unavailable(limits)
        if missing:
            raise PreconditionError(f"limits.{missing}: executor {self._name!r} cannot provide it")
        problem = self._unenforceable(limits) if self._refuse else ""
        if problem:
            raise PreconditionError(
                f"limits.{problem}: executor {self._name!r} cannot enforce it, and refuses limits it "
                "cannot enforce (refuse_unenforceable_limits)"
            )

    def _limits(self, command: Command) -> _Limits:
        """Resolve what to enforce for ``command.limits``: unset limits take the default, then the
        maximum (the engine already refused limits above the maxima). A limit this executor cannot
        enforce while refusing those is a PreconditionError."""
        limits = command.limits.with_defaults(self._default_limits)
        self._refuse_unenforceable(limits)
        memory = limits.memory_bytes if limits.memory_bytes is not None else self._max_limits.memory_bytes
        processes = (
            limits.max_processes if limits.max_processes is not None else self._max_limits.max_processes
        )
        return _Limits(memory_bytes=memory, max_processes=processes)

    def _rlimits(self, limits: _Limits) -> list[Rlimit]:
        """The rlimits for what the cgroup (if any) does not enforce."""
        cg = self._cgroups
        rlimits: list[Rlimit] = []
        if limits.memory_bytes is not None and cg is None:
            rlimits.append(rlimit(resource.RLIMIT_AS, limits.memory_bytes))
        if limits.max_processes is not None and not self.root and not self._cgroup_pids:
            rlimits.append(rlimit(resource.RLIMIT_NPROC, limits.max_processes))
        return rlimits


def _native_helper() -> Path | None:
    """The native helper for placed children, when it was built (else they are Python forks)."""
    helper = bundled_agent()
    problem = usable_agent(helper)
    if problem:
        _log.info("commands needing placement are forked by the spawner process (slower): %s", problem)
        return None
    return helper


def new_token() -> str:
    return f"{_OWNER}-{next(_TOKENS)}"


def _remove_quietly(leaf: ActionCgroup) -> bool:
    try:
        return leaf.remove()
    except OSError as err:
        _log.warning("could not remove cgroup %s: %s", leaf.dirs[0], err)
        return False


def owner_alive(token: str) -> bool:
    """Whether the worker process that made the action cgroup ``token`` still runs (then it is not
    stale): the pid runs and, when the token records it, that process started when the owner did."""
    owner, _, _ = token.partition("-")
    pid, _, started = owner.partition(".")
    if not pid.isdigit() or int(pid) <= 0:
        return False
    if started:
        return _process_start(int(pid)) == started
    try:  # a name without a start time (made by an older version): the pid alone decides
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HAND_OVER_INLINE = 64
"""Entries looked at on the event loop; an action directory with more is walked on a thread."""


async def _hand_over(root: Path, user: tuple[int, int], cgroup_procs: Sequence[str]) -> None:
    """Give ``user`` the action's directories (to create and remove its files in) and the
    ``cgroup.procs`` files its child writes to enter its cgroup. Files stay the worker's: inputs
    are readable but not writable, as in Bazel's own sandboxes. A directory tree of a few
    entries is handled inline (the common case costs a few microseconds); a larger one on a
    thread."""
    uid, gid = user
    for procs in cgroup_procs:
        os.chown(procs, uid, gid)
    os.chmod(root, 0o700)  # another action's user cannot enter (each has its own with run_as_uids)
    found = directories(root, limit=_HAND_OVER_INLINE)
    if found is None:
        await asyncio.to_thread(_chown_all, directories(root), uid, gid)
    else:
        _chown_all(found, uid, gid)


def _chown_all(directories: Sequence[Path], uid: int, gid: int) -> None:
    for directory in directories:
        os.lchown(directory, uid, gid)
