"""Per-action cgroups for both executors: layout, limits, counters, killing what is left, and sweeping."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.errors import InternalError, PreconditionError
from expbuild_worker.execution.proc_stat import STATE, stat_fields
from expbuild_worker.model import ResourceUsage

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")

_HOST_V1_CONTROLLERS = frozenset({"memory", "cpuacct", "pids"})
"""The v1 hierarchies an owned action cgroup lives in (pids only when a process limit is set)."""

_HOST_V2_CONTROLLERS = ("memory", "pids", "cpu")
"""Enabled for the children of every directory of our path on cgroup v2; memory is required."""

RESIDUE_BYTES = 2 << 20
"""What an ended action may leave charged to its cgroup for the cgroup to be reused: the
resident helper's own pages (~16 KiB) and kernel objects (~1-1.5 MiB measured after a few
processes were killed, much of it freed a moment later, after an RCU grace period). The next
action's peak memory includes it, so it is kept small; a cgroup holding more (page cache of
files the action wrote, a tmpfs file) is removed, and the next action gets another."""

RECHECK_SECONDS = 0.02
"""How long a cgroup that is not clean yet right after its action gets before it is looked at
once more (and then removed if it still is not)."""

_KILL_PASSES = 16
"""Rounds of read-and-SIGKILL per kill: each round catches processes forked during the previous one."""


@dataclass(frozen=True, slots=True)
class CgroupReading:
    """What the kernel counted for one action. ``oom_kills`` is None where the kernel does not
    keep it for the cgroup read (cgroup v1 counts OOM kills only in the cgroup the victim was
    in: a Docker action's parent never has it; the Docker daemon's OOMKilled flag covers that
    case, an ``OomWatch`` the case of an engine that does not report it)."""

    usage: ResourceUsage
    oom_kills: int | None


@dataclass(frozen=True, slots=True)
class Mount:
    """One mounted cgroup hierarchy: v2 (``controllers`` empty) or v1 with its controllers."""

    path: Path
    version: int
    controllers: frozenset[str]


def _cgroup_mounts(text: str) -> Iterator[tuple[list[str], list[str]]]:
    """The cgroup (v1 or v2) lines of ``/proc/self/mountinfo``, each split in its fields before
    the ``-`` separator and after it (filesystem type, source, super options)."""
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if sep and len(fields) >= 6 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            yield fields, tail


def parse_mountinfo(text: str) -> list[Mount]:
    """Cgroup hierarchies from ``/proc/self/mountinfo`` that show their root (not a nested view)."""
    mounts: list[Mount] = []
    for fields, tail in _cgroup_mounts(text):
        if fields[3] != "/":
            continue
        path = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            mounts.append(Mount(path, 2, frozenset()))
        elif tail[0] == "cgroup":
            options = frozenset(tail[2].split(","))
            mounts.append(Mount(path, 1, options))
    return mounts


def favors_dynamic_migrations(mountinfo: str) -> bool:
    """Whether a cgroup hierarchy is mounted with ``favordynmods`` (Linux 6.0+).

    Without it, moving a process into a cgroup after a quiet spell waits for an RCU grace period
    (about 8-20 ms measured on cgroup v1 here), and every fork and exit on the machine waits with
    it; with it migrations are cheap and forks and exits pay slightly more. The setting is
    global, whichever hierarchy carries the option (and on some kernels it stays on until
    reboot once set, even if the option is removed: then this says False wrongly)."""
    return any(
        "favordynmods" in tail[2].split(",") or "favordynmods" in fields[5].split(",")
        for fields, tail in _cgroup_mounts(mountinfo)
    )


def read_mountinfo() -> str:
    """This process's mount table, or '' when it cannot be read (then no cgroup is usable)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as fh:
            return fh.read()
    except OSError:
        return ""


def worker_key(worker_id: str) -> str:
    """A cgroup directory name for a worker id: the id itself when safe, else a stable hash."""
    if _SAFE_NAME.match(worker_id):
        return worker_id
    return "w-" + hashlib.sha256(worker_id.encode()).hexdigest()[:16]


class ActionCgroup:
    """One action's own cgroup, made, filled, emptied and removed by the executor that owns it.

    ``dirs`` holds one directory per hierarchy (v1: memory, cpuacct and, with a process limit,
    pids; v2: the one unified directory); the memory directory is first, and every process of
    the action is in it, so its ``cgroup.procs`` lists them all. ``procs`` are the
    ``cgroup.procs`` files a process joins through (writing ``0`` there moves the writer).
    """

    __slots__ = (
        "_cpu",
        "_dirs",
        "_kill_file",
        "_memory",
        "_version",
        "memory_limit",
        "oom_base",
        "process_limit",
        "procs",
        "resident",
        "token",
    )

    def __init__(self, *, token: str, version: int, dirs: tuple[str, ...], cpu: str, kill_file: bool) -> None:
        self.token = token
        self._version = version
        self._dirs = dirs
        self._memory = dirs[0]
        self._cpu = cpu
        self._kill_file = kill_file
        self.procs = tuple(f"{d}/cgroup.procs" for d in dirs)
        self.resident = 0
        """A helper that stays in the cgroup between actions (v1 only), never killed or counted
        as left over here; 0 when there is none."""
        self.oom_base = 0
        """OOM kills counted before the current action (a reused cgroup's count only grows)."""
        self.memory_limit: int | None = None
        self.process_limit: int | None = None
        """The limits written now (None: none), so a reused cgroup's are changed only when they differ."""

    @property
    def dirs(self) -> tuple[str, ...]:
        return self._dirs

    def attach(self, pid: int) -> None:
        """Move the running process ``pid`` in; nothing happens when it has already exited.

        Only for a process that cannot fork meanwhile (a stopped or sleeping one): children it
        forked before the move stay outside, and memory it touched stays charged where it was.
        """
        data = str(pid).encode()
        for path in self.procs:
            try:
                _write(path, data)
            except ProcessLookupError:
                return

    def read(self) -> CgroupReading:
        """CPU time, peak memory and OOM kills of everything that ran in the cgroup since it was
        made, or (reused) since ``ActionCgroups.recycle`` reset it."""
        if self._version == 2:
            return _read_v2(self._memory)
        reading = _read_v1(self._memory, self._cpu, oom=True)
        if self.oom_base and reading.oom_kills is not None:
            return CgroupReading(reading.usage, reading.oom_kills - self.oom_base)
        return reading

    def left_clean(self) -> str:
        """Why this (v1) cgroup cannot take another action: a process other than its resident
        helper, or more than RESIDUE_BYTES charged; '' when it can. Raises OSError naming the
        file that failed."""
        members = _read_pids(self.procs[0])
        if members != {self.resident}:
            others = sorted(members - {self.resident})
            return f"it holds processes {others}, not only its helper {self.resident}"
        fields = stat_fields(self.resident)
        if fields is None or len(fields) <= STATE or fields[STATE] not in (b"S", b"R"):
            state = fields[STATE].decode() if fields is not None and len(fields) > STATE else "gone"
            return f"its helper {self.resident} is not waiting for a command (state {state})"
        held = _read_int(f"{self._memory}/memory.usage_in_bytes")
        if held is None or held > RESIDUE_BYTES:
            return f"{held} bytes are still charged to it (at most {RESIDUE_BYTES} for reuse)"
        return ""

    def reset_v1(self, *, swap: bool) -> None:
        """Start this (v1) cgroup's CPU time and peak memory afresh, and note its OOM kills so
        far; raises OSError naming the file that failed."""
        _write(f"{self._cpu}/cpuacct.usage", b"0")
        _write(f"{self._memory}/memory.max_usage_in_bytes", b"0")
        if swap:
            _write(f"{self._memory}/memory.memsw.max_usage_in_bytes", b"0")
        self.oom_base = _read_keyed(f"{self._memory}/memory.oom_control").get("oom_kill", 0)

    def kill(self) -> int:
        """SIGKILL every process in the cgroup, including those that left the process group;
        returns how many there were (0: it was empty, the usual case, one read).

        cgroup v2 does it atomically (``cgroup.kill``); on v1 the member list is read and
        signalled until a round finds no process it has not signalled yet. Processes are gone
        only once they have exited; ``empty`` and ``remove`` say when that is.
        """
        me = os.getpid()  # never ourselves, whatever a racing thread move left listed
        if self._kill_file:  # v2, which never has a resident helper
            found = len(_read_pids(self.procs[0]) - {me})
            if found:
                with contextlib.suppress(FileNotFoundError):
                    _write(f"{self._memory}/cgroup.kill", b"1")
            return found
        spared = {me, self.resident}
        signalled = set(spared)
        for _ in range(_KILL_PASSES):
            fresh = _read_pids(self.procs[0]) - signalled
            if not fresh:
                break
            for pid in fresh:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            signalled |= fresh
        return len(signalled - spared)

    def empty(self) -> bool:
        """Whether no process is left in the cgroup but its resident helper (a SIGKILLed one
        stays until it has exited)."""
        return not _read_pids(self.procs[0]) - {self.resident}

    def remove(self) -> bool:
        """rmdir the cgroup in every hierarchy; False while a process is still in it."""
        for path in reversed(self._dirs):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
                    return False
                raise
        return True


class OomWatch:
    """OOM events of one cgroup v1 memory cgroup, counted by an eventfd registered on its
    ``memory.oom_control``: the kernel signals it when this cgroup (by its own limit) runs out of
    memory, whichever descendant the victim was in."""

    __slots__ = ("_control", "_count", "_event")

    def __init__(self, event: int, control: int) -> None:
        self._event = event
        self._control = control
        self._count = 0

    @classmethod
    def open(cls, path: str) -> OomWatch:
        """Watch the memory cgroup at ``path``; raises OSError naming the file that failed."""
        control = os.open(f"{path}/memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            event = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(control)
            raise
        watch = cls(event, control)
        try:
            _write(f"{path}/cgroup.event_control", f"{event} {control}".encode())
        except OSError:
            watch.close()
            raise
        return watch

    def count(self) -> int:
        """OOM events so far (reading never blocks)."""
        if self._event >= 0:
            with contextlib.suppress(BlockingIOError):
                self._count += os.eventfd_read(self._event)
        return self._count

    def close(self) -> None:
        """Release both descriptors (the kernel drops the registration); idempotent."""
        for fd in (self._event, self._control):
            if fd >= 0:
                os.close(fd)
        self._event = self._control = -1


class ActionCgroups:
    """Gives each action its own cgroup, ``/<parent>/<worker>/<executor>/<action token>``.

    Two uses share this layout. The Docker executor passes the path as the container's
    ``CgroupParent``: the Docker daemon removes a container's cgroup when the container exits, so its
    counters die with it, while a parent it does not own keeps the hierarchical totals (CPU
    time, peak memory, and on cgroup v2 the OOM-kill count) readable until this class removes
    it after reading; that needs the daemon's ``cgroupfs`` driver and the same cgroup
    filesystem as the daemon. The host executor owns the action cgroup itself
    (``for_host``/``create``): it sets the limits, moves the command in, reads the counters,
    kills what is left and removes it.
    """

    def __init__(
        self, *, mounts: Iterable[Mount], version: int, parent: str, worker_id: str, executor: str
    ) -> None:
        self._version = version
        relevant = [m for m in mounts if m.version == version or (version == 1 and m.version == 2)]
        self._roots = tuple(m.path for m in relevant)
        self._memory: Path | None = None
        self._cpu: Path | None = None
        self._pids: Path | None = None
        for m in relevant:
            if version == 2 and m.version == 2:
                self._memory = self._cpu = m.path
            elif version == 1 and m.version == 1:
                if "memory" in m.controllers:
                    self._memory = m.path
                if "cpuacct" in m.controllers:
                    self._cpu = m.path
                if "pids" in m.controllers:
                    self._pids = m.path
        self._worker_base = "/" + "/".join(p for p in (parent.strip("/"), worker_key(worker_id)) if p)
        self._base = f"{self._worker_base}/{worker_key(executor)}"
        # What an owned cgroup may use; learnt by _prepare (for_host) on this machine.
        self._memsw = False
        self._kill_file = False
        self._pids_usable = False
        self._homes: dict[int, tuple[str, ...]] = {}  # thread id -> its memory and cpuacct ``tasks``

    @classmethod
    def detect(
        cls,
        *,
        cgroup_version: str,
        cgroup_driver: str,
        parent: str,
        worker_id: str,
        executor: str,
        mountinfo: str,
    ) -> ActionCgroups | None:
        """The layout for a Docker daemon reporting ``cgroup_version`` and ``cgroup_driver``, or None
        when this process cannot follow it (systemd driver, or the hierarchies are not visible)."""
        if cgroup_driver != "cgroupfs" or cgroup_version not in ("1", "2"):
            return None
        cgroups = cls(
            mounts=parse_mountinfo(mountinfo),
            version=int(cgroup_version),
            parent=parent,
            worker_id=worker_id,
            executor=executor,
        )
        return cgroups if cgroups.usable else None

    @classmethod
    def for_host(cls, *, mountinfo: str, parent: str, worker_id: str, executor: str) -> ActionCgroups:
        """The layout for an executor that owns its action cgroups, ready to ``create`` them.

        Uses cgroup v1 when its memory hierarchy is mounted (hybrid systems too), else the
        unified v2 hierarchy. Creates the executor's directory (enabling the memory, pids and
        cpu controllers for the children of each directory on the way, on v2) and a probe
        cgroup in it; raises PreconditionError saying why when this process cannot.
        """
        mounts = parse_mountinfo(mountinfo)
        v1 = [m for m in mounts if m.version == 1 and m.controllers & _HOST_V1_CONTROLLERS]
        v2 = [m for m in mounts if m.version == 2]
        if any("memory" in m.controllers for m in v1):
            cgroups = cls(mounts=v1, version=1, parent=parent, worker_id=worker_id, executor=executor)
            if cgroups._cpu is None:
                raise PreconditionError("the cgroup v1 cpuacct hierarchy is not mounted")
        elif v2:
            cgroups = cls(mounts=v2[:1], version=2, parent=parent, worker_id=worker_id, executor=executor)
        else:
            raise PreconditionError("no cgroup hierarchy with the memory controller is mounted")
        cgroups._prepare()
        return cgroups

    @property
    def usable(self) -> bool:
        return self._memory is not None and self._cpu is not None

    @property
    def version(self) -> int:
        return self._version

    @property
    def enforces_processes(self) -> bool:
        """Whether ``create`` can set a process limit (the pids controller is available)."""
        return self._pids_usable

    @property
    def moves_threads(self) -> bool:
        """Whether ``spawning_into`` works: v1 only (v2 moves whole processes, never one thread)."""
        return self._version == 1

    @property
    def limits_swap(self) -> bool:
        """Whether a memory limit also covers swap (v1 needs swap accounting for that)."""
        return self._memsw or self._version == 2

    @property
    def base(self) -> str:
        """This executor's directory, relative to each hierarchy's root."""
        return self._base

    def parent_for(self, token: str) -> str:
        """The ``CgroupParent`` of the container of the action ``token``."""
        return f"{self._base}/{token}"

    def read(self, token: str) -> CgroupReading:
        """Counters of the action's (parent) cgroup; fields the kernel does not offer are None."""
        rel = self.parent_for(token)
        assert self._memory is not None and self._cpu is not None
        if self._version == 2:
            return _read_v2(f"{self._memory}{rel}")
        return _read_v1(f"{self._memory}{rel}", f"{self._cpu}{rel}", oom=False)

    def limit_container_processes(self, token: str, container_id: str, count: int) -> bool:
        """Set ``pids.max`` of the container ``container_id`` under the action ``token``'s parent.

        False when there is no pids hierarchy here or the container's cgroup is not there (it
        exited); another error (the file refused the write) raises OSError naming the file."""
        directory = self._container_directory(token, container_id, self._pids_root())
        if directory is None:
            return False
        try:
            _write(f"{directory}/pids.max", _pids_max(count))
        except FileNotFoundError:
            return False
        return True

    def container_processes(self, token: str, container_id: str) -> list[int]:
        """The processes in the container's cgroup now (none when it is not there)."""
        directory = self._container_directory(token, container_id, self._pids_root() or self._memory)
        return sorted(_read_pids(f"{directory}/cgroup.procs")) if directory is not None else []

    def _pids_root(self) -> Path | None:
        return self._memory if self._version == 2 else self._pids

    def _container_directory(self, token: str, container_id: str, root: Path | None) -> str | None:
        """The container's cgroup directory: Docker names it by the container id, Podman (the
        cgroupfs manager) ``libpod-<id>``."""
        if root is None:
            return None
        parent = f"{root}{self.parent_for(token)}"
        for name in (container_id, f"libpod-{container_id}"):
            if os.path.isdir(f"{parent}/{name}"):
                return f"{parent}/{name}"
        return None

    def hold_memory_limit(self, token: str, memory_bytes: int) -> OomWatch:
        """cgroup v1: make the action's (parent) memory cgroup with the limit (and ``memsw`` where
        swap is accounted) and watch it for OOM; the container is then created without a limit.

        v1 counts an OOM kill only in the cgroup the victim was in, which an engine removes with
        the container; an engine that does not report the kill itself (Podman) would leave the
        action looking like a plain ``kill -9``. With the limit here the OOM happens in this
        cgroup, whose eventfd notification the returned watch counts. Raises InternalError
        naming the file that failed."""
        assert self._version == 1 and self._memory is not None
        path = f"{self._memory}{self.parent_for(token)}"
        limit = str(memory_bytes).encode()
        try:
            os.makedirs(path, exist_ok=True)
            _write(f"{path}/memory.limit_in_bytes", limit)
            if os.path.exists(f"{path}/memory.memsw.limit_in_bytes"):
                _write(f"{path}/memory.memsw.limit_in_bytes", limit)
            return OomWatch.open(path)
        except OSError as err:
            raise InternalError(
                f"could not limit the memory of cgroup {self.parent_for(token)} for action {token}: "
                f"{err.strerror} ({err.filename})"
            ) from err

    def remove(self, token: str) -> bool:
        """Remove the action's cgroup in every hierarchy; False if one is still busy."""
        rel = self.parent_for(token).lstrip("/")
        return all(_remove_tree(root / rel) for root in self._roots)

    def sweep(self, live: Collection[str]) -> int:
        """Remove this executor's action cgroups whose token is not in ``live``; returns how many."""
        removed: set[str] = set()
        for root, entry in self._entries():
            if entry.name not in live and _remove_tree(root / self._base.lstrip("/") / entry.name):
                removed.add(entry.name)
        return len(removed)

    def remove_base(self) -> None:
        """Remove this executor's (and then the worker's) directory when no action cgroup is left."""
        for root in self._roots:
            for base in (self._base, self._worker_base):
                with contextlib.suppress(OSError):
                    os.rmdir(root / base.lstrip("/"))

    # ---- owned action cgroups (host) ------------------------------------------------------------

    def create(
        self, token: str, *, memory_bytes: int | None, max_processes: int | None, pids: bool = False
    ) -> ActionCgroup:
        """Make the action's cgroup with its limits set; the command is moved in afterwards.

        A memory limit covers swap too where the kernel can say so (v1 ``memsw``, v2
        ``memory.swap.max=0``), so a command cannot page its way past it. ``max_processes``
        (and ``pids``: a v1 pids directory without a limit yet, for ``limit_processes`` later)
        needs ``enforces_processes``. Raises InternalError naming the file that failed.
        """
        rel = self.parent_for(token)
        leaf = self._leaf(token, pids=pids or max_processes is not None)
        made: list[str] = []
        try:
            for path in leaf.dirs:
                os.mkdir(path)
                made.append(path)
            if memory_bytes is not None:
                self._write_memory_limit(leaf, memory_bytes)
            if max_processes is not None:
                _write(f"{leaf.dirs[-1]}/pids.max", _pids_max(max_processes))
                leaf.process_limit = max_processes
        except OSError as err:
            for path in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(path)
            raise InternalError(
                f"could not create cgroup {rel} for action {token}: {err.strerror} ({err.filename})"
            ) from err
        return leaf

    def set_limits(self, leaf: ActionCgroup, *, memory_bytes: int | None, max_processes: int | None) -> None:
        """Give a cgroup the limits of its next action (None: no limit), writing only those that
        differ from what it has: one ``create`` made ahead of need, or one reused. Raises
        InternalError naming the file that failed (v1 refuses a memory limit below what the
        cgroup already holds, EBUSY)."""
        try:
            if memory_bytes != leaf.memory_limit:
                self._write_memory_limit(leaf, memory_bytes)
            if max_processes != leaf.process_limit:
                _write(f"{leaf.dirs[-1]}/pids.max", _pids_max(max_processes))
                leaf.process_limit = max_processes
        except OSError as err:
            raise InternalError(
                f"could not set the limits of cgroup {self.parent_for(leaf.token)}: "
                f"{err.strerror} ({err.filename})"
            ) from err

    def _write_memory_limit(self, leaf: ActionCgroup, memory_bytes: int | None) -> None:
        """On v1 the swap-included limit may never be below the memory limit: it is written
        first when the limit rises, last when it falls."""
        memory = leaf.dirs[0]
        limit = b"-1" if memory_bytes is None else str(memory_bytes).encode()
        if self._version == 2:
            _write(f"{memory}/memory.max", b"max" if memory_bytes is None else limit)
            with contextlib.suppress(FileNotFoundError):  # no swap accounting: no swap to limit
                _write(f"{memory}/memory.swap.max", b"max" if memory_bytes is None else b"0")
        else:
            files = (
                ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
                if self._memsw
                else ["memory.limit_in_bytes"]
            )
            rising = memory_bytes is None or (
                leaf.memory_limit is not None and memory_bytes > leaf.memory_limit
            )
            for name in reversed(files) if rising else files:
                _write(f"{memory}/{name}", limit)
        leaf.memory_limit = memory_bytes

    def recycle(self, leaf: ActionCgroup) -> str:
        """Make a v1 cgroup whose action has ended ready for the next one, keeping its limits
        and its resident helper: nothing but that helper may be left in it, nor more than
        RESIDUE_BYTES charged; then its CPU time and peak memory are reset and its OOM kills
        so far noted. Returns why it cannot be reused, '' when it can. Not for v2, whose CPU
        time and (before Linux 6.12) peak memory cannot be reset."""
        if self._version != 1 or not leaf.resident:
            return "only a cgroup v1 cgroup with a resident helper is reused"
        try:
            problem = leaf.left_clean()
            if problem:  # what was just killed may still be exiting, its kernel memory freed
                time.sleep(RECHECK_SECONDS)  # after an RCU grace period: look once more
                problem = leaf.left_clean()
            if not problem:
                leaf.reset_v1(swap=self._memsw)
        except OSError as err:
            return f"{err.strerror} ({err.filename})"
        return problem

    @contextlib.contextmanager
    def spawning_into(self, leaf: ActionCgroup) -> Iterator[None]:
        """Run the block with the calling thread in ``leaf`` (cgroup v1), so that a process it
        spawns (vfork included) is born there: nothing it runs or forks is ever outside.

        Moving the spawned process in afterwards would race it: the parent of a vfork resumes
        only when the child has exec'd, and the child often runs and forks first. The thread
        goes back to its own cgroups when the block ends; while in, what the worker charges
        (kernel memory, and all its memory when this thread owns the address space, usually
        the main thread) and the thread's CPU time count for the action: the ~0.3 ms a spawn
        takes. Do not use it for a cgroup with limits: the worker would count against them.
        """
        tid = threading.get_native_id()
        home = self._homes.get(tid)
        if home is None:
            home = self._homes[tid] = self._home_of(tid)
        data = str(tid).encode()
        entered = 0
        try:
            for directory, _ in zip(leaf.dirs, home, strict=False):
                _write(f"{directory}/tasks", data)
                entered += 1
            yield
        finally:
            try:
                for path in home[:entered]:
                    _write(path, data)
            except OSError as err:
                raise InternalError(
                    f"could not move worker thread {tid} back out of cgroup {leaf.token}: {err}"
                ) from err

    def _home_of(self, tid: int) -> tuple[str, ...]:
        """The ``tasks`` files of thread ``tid``'s own memory and cpuacct cgroups (v1)."""
        assert self._memory is not None and self._cpu is not None
        paths = {"memory": "", "cpuacct": ""}
        data = _read(f"/proc/self/task/{tid}/cgroup") or b""
        for line in data.decode(errors="replace").splitlines():
            _, controllers, path = line.split(":", 2)
            for controller in controllers.split(","):
                if controller in paths:
                    paths[controller] = path.rstrip("/")
        return tuple(
            dict.fromkeys((f"{self._memory}{paths['memory']}/tasks", f"{self._cpu}{paths['cpuacct']}/tasks"))
        )

    def stale(self, owner_alive: Callable[[str], bool]) -> list[ActionCgroup]:
        """This executor's action cgroups whose owner is gone (a previous run's), to kill and remove."""
        tokens = {entry.name for _, entry in self._entries() if not owner_alive(entry.name)}
        return [self._leaf(token, pids=True) for token in sorted(tokens)]

    def _leaf(self, token: str, *, pids: bool) -> ActionCgroup:
        rel = self.parent_for(token)
        assert self._memory is not None and self._cpu is not None
        if self._version == 2:
            dirs: tuple[str, ...] = (f"{self._memory}{rel}",)
        else:
            roots = [self._memory, self._cpu] + ([self._pids] if pids and self._pids is not None else [])
            dirs = tuple(dict.fromkeys(f"{root}{rel}" for root in roots))  # co-mounted: one directory
        return ActionCgroup(
            token=token, version=self._version, dirs=dirs, cpu=f"{self._cpu}{rel}", kill_file=self._kill_file
        )

    def _prepare(self) -> None:
        """Create this executor's directories and learn what its action cgroups can use."""
        assert self._memory is not None
        for root in self._roots:
            path = root / self._base.lstrip("/")
            try:
                os.makedirs(path, exist_ok=True)
            except OSError as err:
                raise PreconditionError(f"cannot create cgroup {path}: {err.strerror}") from err
        base = self._memory / self._base.lstrip("/")
        if self._version == 2:
            self._enable_v2_controllers(base)
            enabled = _read_words(base / "cgroup.subtree_control")
            self._pids_usable = "pids" in enabled
            self._kill_file = (base / "cgroup.kill").exists()
        else:
            self._pids_usable = self._pids is not None
            self._memsw = (base / "memory.memsw.limit_in_bytes").exists()
        probe = f"{os.getpid()}-probe"
        try:
            leaf = self.create(probe, memory_bytes=None, max_processes=None)
        except InternalError as err:
            raise PreconditionError(str(err)) from err
        try:
            if self.moves_threads:  # a thread of this process may go in and come back out
                with self.spawning_into(leaf):
                    pass
        except (OSError, InternalError) as err:
            raise PreconditionError(
                f"cannot move a thread into cgroup {self.parent_for(probe)}: {err}"
            ) from err
        finally:
            leaf.remove()

    def _enable_v2_controllers(self, base: Path) -> None:
        """Delegate memory (required), pids and cpu down every directory of our path."""
        assert self._memory is not None
        chain = [self._memory]
        for part in self._base.strip("/").split("/"):
            chain.append(chain[-1] / part)
        for directory in chain:
            available = _read_words(directory / "cgroup.controllers")
            for controller in _HOST_V2_CONTROLLERS:
                if controller not in available:
                    if controller == "memory":
                        raise PreconditionError(f"the memory controller is not available in {directory}")
                    continue
                try:
                    _write(str(directory / "cgroup.subtree_control"), f"+{controller}".encode())
                except OSError as err:
                    if controller == "memory":
                        raise PreconditionError(
                            f"cannot enable the memory controller below {directory}: {err.strerror}"
                        ) from err

    def _entries(self) -> list[tuple[Path, os.DirEntry[str]]]:
        """Every action directory of this executor, in every hierarchy."""
        found: list[tuple[Path, os.DirEntry[str]]] = []
        base = self._base.lstrip("/")
        for root in self._roots:
            try:
                entries = list(os.scandir(root / base))
            except OSError:
                continue
            found.extend((root, entry) for entry in entries if entry.is_dir(follow_symlinks=False))
        return found


PID_MAX_LIMIT = 1 << 22
"""No system has more processes (the kernel's PID_MAX_LIMIT); ``pids.max`` refuses more."""


def _pids_max(count: int | None) -> bytes:
    """``pids.max`` for at most ``count`` processes (None: no limit). A count the kernel cannot
    take (the action's limit plus the helpers around it may pass PID_MAX_LIMIT) is no limit."""
    return b"max" if count is None or count >= PID_MAX_LIMIT else str(count).encode()


def _write(path: str, data: bytes) -> None:
    """One write to a cgroup file; an error names the file."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    except OSError as err:
        err.filename = path
        raise
    finally:
        os.close(fd)


def _read(path: str) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def _read_int(path: str) -> int | None:
    data = _read(path)
    try:
        return int(data) if data is not None else None
    except ValueError:
        return None


def _read_keyed(path: str) -> dict[str, int]:
    """A ``key value`` per line file (cpu.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    data = _read(path)
    if data is None:
        return values
    for line in data.decode(errors="replace").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _read_words(path: Path) -> set[str]:
    data = _read(str(path))
    return set(data.decode(errors="replace").split()) if data is not None else set()


def _read_pids(path: str) -> set[int]:
    """The processes listed in a ``cgroup.procs`` file (none when it is gone)."""
    fd = -1
    try:
        fd = os.open(path, os.O_RDONLY)
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENODEV):  # removed, or being removed (v1: ENODEV)
            return set()
        raise
    finally:
        if fd >= 0:
            os.close(fd)
    return {int(word) for word in b"".join(chunks).split()}


def _read_v1(memory: str, cpu: str, *, oom: bool) -> CgroupReading:
    user_ns = _read_int(f"{cpu}/cpuacct.usage_user")
    sys_ns = _read_int(f"{cpu}/cpuacct.usage_sys")
    user: float | None
    system: float | None
    if user_ns is not None and sys_ns is not None:
        user, system = user_ns / 1e9, sys_ns / 1e9
    else:  # kernels before 4.7 only offer ticks
        ticks = _read_keyed(f"{cpu}/cpuacct.stat")
        hz = os.sysconf("SC_CLK_TCK")
        user = ticks["user"] / hz if "user" in ticks else None
        system = ticks["system"] / hz if "system" in ticks else None
    peak = _read_int(f"{memory}/memory.max_usage_in_bytes")
    # The cgroup's own count (kernel 4.13 and later); useless in a parent, hence ``oom``.
    oom_kills = _read_keyed(f"{memory}/memory.oom_control").get("oom_kill") if oom else None
    return CgroupReading(ResourceUsage(user, system, peak), oom_kills)


def _read_v2(path: str) -> CgroupReading:
    stat = _read_keyed(f"{path}/cpu.stat")
    events = _read_keyed(f"{path}/memory.events")
    return CgroupReading(
        ResourceUsage(
            user_cpu_seconds=stat["user_usec"] / 1e6 if "user_usec" in stat else None,
            system_cpu_seconds=stat["system_usec"] / 1e6 if "system_usec" in stat else None,
            peak_memory_bytes=_read_int(f"{path}/memory.peak"),
        ),
        events.get("oom_kill"),
    )


def _remove_tree(path: Path) -> bool:
    """rmdir a cgroup and its (empty) children, deepest first; False if one is busy.

    Not ``fs.remove_tree``: a cgroup's files cannot be unlinked (rmdir of the directory takes
    them), and a cgroup that still has processes answers EBUSY, which must be told apart."""
    try:
        children = [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return True
    except OSError:
        return False
    ok = all(_remove_tree(Path(child)) for child in children)
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return ok
    except OSError as err:
        if err.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise
    return ok
