"""Per-action parent cgroups: CPU time, peak memory and OOM kills, readable after the container is gone."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.model import ResourceUsage

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True, slots=True)
class CgroupReading:
    """What the kernel counted for one action. ``oom_kills`` is None where the kernel does not
    keep it for the parent (cgroup v1 counts OOM kills only in the container's own cgroup,
    which the engine deletes at exit; the engine's OOMKilled flag covers that case)."""

    usage: ResourceUsage
    oom_kills: int | None


@dataclass(frozen=True, slots=True)
class Mount:
    """One mounted cgroup hierarchy: v2 (``controllers`` empty) or v1 with its controllers."""

    path: Path
    version: int
    controllers: frozenset[str]


def parse_mountinfo(text: str) -> list[Mount]:
    """Cgroup hierarchies from ``/proc/self/mountinfo`` that show their root (not a nested view)."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or fields[3] != "/":
            continue
        path = Path(fields[4].replace("\\040", " "))
        if tail[0] == "cgroup2":
            mounts.append(Mount(path, 2, frozenset()))
        elif tail[0] == "cgroup":
            options = frozenset(tail[2].split(","))
            mounts.append(Mount(path, 1, options))
    return mounts


def worker_key(worker_id: str) -> str:
    """A cgroup directory name for a worker id: the id itself when safe, else a stable hash."""
    if _SAFE_NAME.match(worker_id):
        return worker_id
    return "w-" + hashlib.sha256(worker_id.encode()).hexdigest()[:16]


class ActionCgroups:
    """Gives each action its own parent cgroup, ``/<parent>/<worker>/<executor>/<action token>``.

    The engine removes a container's cgroup when the container exits, so its counters die
    with it; a parent it does not own keeps the hierarchical totals (CPU time, peak memory,
    and on cgroup v2 the OOM-kill count) readable until this class removes it after reading.
    Works with the engine's ``cgroupfs`` driver on cgroup v1 and v2, when this process sees
    the same cgroup filesystem as the engine (a local engine).
    """

    def __init__(
        self, *, mounts: Iterable[Mount], version: int, parent: str, worker_id: str, executor: str
    ) -> None:
        self._version = version
        relevant = [m for m in mounts if m.version == version or (version == 1 and m.version == 2)]
        self._roots = tuple(m.path for m in relevant)
        self._memory: Path | None = None
        self._cpu: Path | None = None
        for m in relevant:
            if version == 2 and m.version == 2:
                self._memory = self._cpu = m.path
            elif version == 1 and m.version == 1:
                if "memory" in m.controllers:
                    self._memory = m.path
                if "cpuacct" in m.controllers:
                    self._cpu = m.path
        self._worker_base = "/" + "/".join(p for p in (parent.strip("/"), worker_key(worker_id)) if p)
        self._base = f"{self._worker_base}/{worker_key(executor)}"

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
        """The layout for an engine reporting ``cgroup_version`` and ``cgroup_driver``, or None
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

    @property
    def usable(self) -> bool:
        return self._memory is not None and self._cpu is not None

    @property
    def version(self) -> int:
        return self._version

    def parent_for(self, token: str) -> str:
        """The ``CgroupParent`` of the container of the action ``token``."""
        return f"{self._base}/{token}"

    def read(self, token: str) -> CgroupReading:
        """Counters of the action's cgroup; fields the kernel does not offer are None."""
        rel = self.parent_for(token).lstrip("/")
        if self._version == 2:
            assert self._memory is not None
            return _read_v2(self._memory / rel)
        assert self._memory is not None and self._cpu is not None
        return _read_v1(self._memory / rel, self._cpu / rel)

    def remove(self, token: str) -> bool:
        """Remove the action's cgroup in every hierarchy; False if one is still busy."""
        rel = self.parent_for(token).lstrip("/")
        return all(_remove_tree(root / rel) for root in self._roots)

    def sweep(self, live: Collection[str]) -> int:
        """Remove this executor's action cgroups whose token is not in ``live``; returns how many."""
        removed: set[str] = set()
        base = self._base.lstrip("/")
        for root in self._roots:
            try:
                entries = list(os.scandir(root / base))
            except OSError:
                continue
            for entry in entries:
                if (
                    entry.is_dir(follow_symlinks=False)
                    and entry.name not in live
                    and _remove_tree(Path(entry.path))
                ):
                    removed.add(entry.name)
        return len(removed)

    def remove_base(self) -> None:
        """Remove this executor's (and then the worker's) directory when no action cgroup is left."""
        for root in self._roots:
            for base in (self._base, self._worker_base):
                with contextlib.suppress(OSError):
                    os.rmdir(root / base.lstrip("/"))


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A ``key value`` per line file (cpu.stat, memory.events, memory.oom_control)."""
    values: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return values
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            values[key] = int(value)
    return values


def _read_v1(memory: Path, cpu: Path) -> CgroupReading:
    user_ns = _read_int(cpu / "cpuacct.usage_user")
    sys_ns = _read_int(cpu / "cpuacct.usage_sys")
    user: float | None
    system: float | None
    if user_ns is not None and sys_ns is not None:
        user, system = user_ns / 1e9, sys_ns / 1e9
    else:  # kernels before 4.7 only offer ticks
        ticks = _read_keyed(cpu / "cpuacct.stat")
        hz = os.sysconf("SC_CLK_TCK")
        user = ticks["user"] / hz if "user" in ticks else None
        system = ticks["system"] / hz if "system" in ticks else None
    peak = _read_int(memory / "memory.max_usage_in_bytes")
    return CgroupReading(ResourceUsage(user, system, peak), None)


def _read_v2(path: Path) -> CgroupReading:
    stat = _read_keyed(path / "cpu.stat")
    events = _read_keyed(path / "memory.events")
    return CgroupReading(
        ResourceUsage(
            user_cpu_seconds=stat["user_usec"] / 1e6 if "user_usec" in stat else None,
            system_cpu_seconds=stat["system_usec"] / 1e6 if "system_usec" in stat else None,
            peak_memory_bytes=_read_int(path / "memory.peak"),
        ),
        events.get("oom_kill"),
    )


def _remove_tree(path: Path) -> bool:
    """rmdir a cgroup and its (empty) children, deepest first; False if one is busy."""
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
