"""The container pool: containers started ahead of need per shape, entered by exec, used once or recycled."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from expbuild_worker.config import DockerPoolConfig
from expbuild_worker.execution.cgroups import CgroupReading, parse_mountinfo
from expbuild_worker.execution.docker._agent import AgentLink
from expbuild_worker.model import ResourceLimits, ResourceUsage

_log = logging.getLogger(__name__)

_MS_BIND = 4096
_MS_SHARED = 1 << 20
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)

_KILL_PASSES = 16
"""Rounds of read-and-SIGKILL: each round catches processes forked during the previous one."""

LABEL_POOL = "io.expbuild.pool"
"""Set on pool containers (``idle``); the janitor treats them like any other of this worker."""


def mount_bind(source: Path, target: Path) -> None:
    """Bind ``source`` over ``target`` (the slot's shared mount point): the container sees it at /work."""
    if _libc.mount(str(source).encode(), str(target).encode(), None, _MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"bind mount of {source} on {target}: {os.strerror(err)}")


def make_shared_mount_point(path: Path) -> None:
    """Make ``path`` a mount point of its own in a shared peer group.

    A container that mounts it with ``rslave`` propagation then sees every later mount on it:
    that is how an action directory, staged after the container started, appears at /work."""
    mount_bind(path, path)
    if _libc.mount(b"none", str(path).encode(), None, _MS_SHARED, None) != 0:
        err = ctypes.get_errno()
        unmount(path)
        raise OSError(err, f"making {path} a shared mount: {os.strerror(err)}")


def unmount(path: Path) -> bool:
    """Detach the top mount at ``path``; False when nothing was mounted there."""
    return bool(_libc.umount2(str(path).encode(), _MNT_DETACH) == 0)


def mounts_at(path: Path) -> int:
    """How many mounts are stacked at ``path`` (a bind of a directory onto itself counts: it is on
    the same device, which ``os.path.ismount`` cannot tell)."""
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as fh:
        return sum(1 for line in fh if line.split()[4] == target)


def release_mount_point(path: Path) -> None:
    """Unmount everything stacked on ``path`` and remove the directory; gone already is fine."""
    for _ in range(8):
        if not mounts_at(path) or not unmount(path):
            break
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(path)


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Everything of a container fixed at its creation that an action may choose.

    The rest that shapes a container (security options, runtime, user, init, tmpfs, read-only
    root) is the executor's configuration: one executor's containers all share it, and a pool
    belongs to one executor."""

    image: str
    network_mode: str
    cpu_cores: float | None
    memory_bytes: int | None
    max_processes: int | None

    @classmethod
    def of(cls, image: str, network_mode: str, limits: ResourceLimits) -> PoolKey:
        return cls(image, network_mode, limits.cpu_cores, limits.memory_bytes, limits.max_processes)

    @property
    def limits(self) -> ResourceLimits:
        return ResourceLimits(
            cpu_cores=self.cpu_cores, memory_bytes=self.memory_bytes, max_processes=self.max_processes
        )


class ContainerCounters:
    """The cgroup of one running pool container, read between actions to make usage per action.

    The container's cgroup lives as long as the container, so an action's usage is the
    difference of its counters across the action (CPU time, OOM kills), and peak memory is the
    v1 high-water mark reset when the action enters. On cgroup v2 a reset of ``memory.peak``
    needs a newer kernel; there the peak since the container started is reported."""

    def __init__(self, *, version: int, memory: Path, cpu: Path) -> None:
        self._version = version
        self._memory = memory
        self._cpu = cpu
        self._base_cpu = (0.0, 0.0)
        self._base_oom = 0

    @classmethod
    def locate(cls, *, mountinfo: str, version: int, relative: str) -> ContainerCounters | None:
        """The container whose cgroup is ``relative`` (``<cgroup parent>/<container id>``)."""
        memory = cpu = None
        for m in parse_mountinfo(mountinfo):
            if version == 2 and m.version == 2:
                memory = cpu = m.path
            elif version == 1 and m.version == 1:
                if "memory" in m.controllers:
                    memory = m.path
                if "cpuacct" in m.controllers:
                    cpu = m.path
        if memory is None or cpu is None:
            return None
        rel = relative.strip("/")
        counters = cls(version=version, memory=memory / rel, cpu=cpu / rel)
        return counters if counters._memory.is_dir() else None

    def procs(self) -> set[int]:
        """Every process in the container now (host pids)."""
        try:
            data = (self._memory / "cgroup.procs").read_bytes()
        except FileNotFoundError:
            return set()
        return {int(word) for word in data.split()}

    def _cpu_seconds(self) -> tuple[float, float]:
        if self._version == 2:
            stat = _keyed(self._cpu / "cpu.stat")
            return stat.get("user_usec", 0) / 1e6, stat.get("system_usec", 0) / 1e6
        user = _int(self._cpu / "cpuacct.usage_user") or 0
        system = _int(self._cpu / "cpuacct.usage_sys") or 0
        return user / 1e9, system / 1e9

    def _oom_kills(self) -> int:
        name = "memory.events" if self._version == 2 else "memory.oom_control"
        return _keyed(self._memory / name).get("oom_kill", 0)

    def begin(self) -> None:
        """Mark the start of an action: remember CPU and OOM counts, reset the memory high-water mark."""
        if self._version == 1:
            with contextlib.suppress(OSError):
                (self._memory / "memory.max_usage_in_bytes").write_bytes(b"0")
        self._base_cpu = self._cpu_seconds()
        self._base_oom = self._oom_kills()

    def read(self) -> CgroupReading:
        """Usage since ``begin``."""
        user, system = self._cpu_seconds()
        peak_file = "memory.peak" if self._version == 2 else "memory.max_usage_in_bytes"
        return CgroupReading(
            ResourceUsage(
                user_cpu_seconds=max(0.0, user - self._base_cpu[0]),
                system_cpu_seconds=max(0.0, system - self._base_cpu[1]),
                peak_memory_bytes=_int(self._memory / peak_file),
            ),
            self._oom_kills() - self._base_oom,
        )

    def kill_all_but(self, keep: frozenset[int]) -> bool:
        """SIGKILL every process of the container not in ``keep``; True when none is left."""
        for _ in range(_KILL_PASSES):
            left = self.procs() - keep
            if not left:
                return True
            for pid in left:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.002)
        return not (self.procs() - keep)


def _int(path: Path) -> int | None:
    try:
        return int(path.read_bytes())
    except (OSError, ValueError):
        return None


def _keyed(path: Path) -> dict[str, int]:
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


def empty_directory(path: Path) -> None:
    """Remove everything inside ``path`` (not following symlinks: rmtree works on directory fds)."""
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


@dataclass(eq=False)
class Slot:
    """One pool container: its shape, its mount point, and what was true of it when it became idle."""

    token: str
    key: PoolKey
    mount_point: Path
    container_id: str = ""
    init_pid: int = 0
    idle_pids: frozenset[int] = frozenset()
    counters: ContainerCounters | None = None
    uses: int = 0
    pids_max: int | None = None  # an action's exact PIDs limit here (its own plus the idle processes)
    agent: AgentLink | None = None  # the container's PID 1 is the agent: entered without the engine
    idle_since: float = field(default_factory=time.monotonic)


class ContainerPool:
    """Idle containers per key; filled in the background, emptied by age, never oversized.

    Two lists per key: ``fresh`` containers no action has entered, and ``used`` ones that were
    recycled and proven clean. A fresh request takes only a fresh one; a recycled request
    prefers a used one. ``max_size`` bounds a key's idle plus busy containers, and
    ``room()`` (the executor's capacity minus what runs) bounds them all: an idle container
    holds memory and a slot of the worker's capacity, so the pool never starts one that
    would take a running action's place.
    """

    def __init__(
        self,
        *,
        config: DockerPoolConfig,
        make: Callable[[PoolKey], Awaitable[Slot | None]],
        discard: Callable[[Slot], Awaitable[None]],
        alive: Callable[[Slot], bool],
        room: Callable[[], int],
    ) -> None:
        self._config = config
        self._make = make
        self._discard = discard
        self._alive = alive
        self._room = room
        self._fresh: dict[PoolKey, deque[Slot]] = {}
        self._used: dict[PoolKey, deque[Slot]] = {}
        self._busy: dict[PoolKey, int] = {}
        self._filling: dict[PoolKey, int] = {}
        self._busy_tokens: set[str] = set()
        self._filler: dict[PoolKey, asyncio.Task[None]] = {}
        self._keys: set[PoolKey] = set()
        self._tasks: set[asyncio.Future[None]] = set()
        self._expiry: asyncio.Task[None] | None = None
        self._closed = False

    # ---- what the janitor and the capacity count -------------------------------------------------

    def tokens(self) -> set[str]:
        """Tokens of every container the pool owns (idle, being made, or lent out)."""
        live = set(self._busy_tokens)
        for slots in (*self._fresh.values(), *self._used.values()):
            live.update(s.token for s in slots)
        return live

    def idle_count(self) -> int:
        return sum(len(d) for d in (*self._fresh.values(), *self._used.values())) + sum(
            self._filling.values()
        )

    def _size(self, key: PoolKey) -> int:
        return (
            len(self._fresh.get(key, ()))
            + len(self._used.get(key, ()))
            + self._busy.get(key, 0)
            + self._filling.get(key, 0)
        )

    # ---- lending ---------------------------------------------------------------------------------

    def take(self, key: PoolKey, *, recycled: bool) -> Slot | None:
        """An idle container of ``key``, or None (the caller runs cold); the key is filled again behind."""
        self.want(key)
        slot = None
        while slot is None:
            if recycled and self._used.get(key):
                slot = self._used[key].popleft()
            elif self._fresh.get(key):
                slot = self._fresh[key].popleft()
            else:
                break
            if not self._alive(slot):  # killed from outside: never lent
                _log.warning("pool: container %s died while idle; replacing it", slot.container_id[:12])
                self._drop(slot)
                self._kick(key)
                slot = None
        if slot is not None:
            self._busy[key] = self._busy.get(key, 0) + 1
            self._busy_tokens.add(slot.token)
            self._kick(key)
        return slot

    def give_back(self, slot: Slot) -> None:
        """A recycled container proven clean becomes idle again."""
        self._release(slot)
        if self._closed or slot.uses >= self._config.max_uses:
            self._drop(slot)
            return
        slot.idle_since = time.monotonic()
        self._used.setdefault(slot.key, deque()).append(slot)

    def retire(self, slot: Slot) -> None:
        """A container that was used once (fresh) or failed a check: removed, never lent again."""
        self._release(slot)
        self._drop(slot)

    def _release(self, slot: Slot) -> None:
        self._busy[slot.key] = max(0, self._busy.get(slot.key, 0) - 1)
        self._busy_tokens.discard(slot.token)
        self._kick(slot.key)

    # ---- filling and expiry ----------------------------------------------------------------------

    def want(self, key: PoolKey) -> None:
        """Keep ``min_idle`` fresh containers of ``key`` from now on."""
        if key not in self._keys and not self._closed:
            self._keys.add(key)
            self._kick(key)

    async def fill(self, keys: list[PoolKey]) -> None:
        """Fill ``keys`` to their minimum now (Warmup); returns when done or out of room."""
        for key in keys:
            self.want(key)
        tasks = [t for k in keys if (t := self._filler.get(k)) is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _kick(self, key: PoolKey) -> None:
        if self._closed or key not in self._keys:
            return
        task = self._filler.get(key)
        if task is None or task.done():
            self._filler[key] = asyncio.ensure_future(self._fill(key))
        if self._expiry is None:
            self._expiry = asyncio.ensure_future(self._expire())

    async def _fill(self, key: PoolKey) -> None:
        """Start containers one at a time: a pool filling must not crowd out running actions' starts."""
        failures = 0
        while not self._closed and failures < 3:
            if len(self._fresh.get(key, ())) + self._filling.get(key, 0) >= self._config.min_idle:
                return
            if self._size(key) >= self._config.max_size or self._room() <= 0:
                return
            self._filling[key] = self._filling.get(key, 0) + 1
            try:
                slot = await self._make(key)
            except Exception as err:
                _log.warning("pool: could not start a container for %s: %s", key.image, err)
                slot = None
            finally:
                self._filling[key] -= 1
            if slot is None:
                failures += 1
                await asyncio.sleep(0.5 * failures)
                continue
            if self._closed:
                self._drop(slot)
                return
            self._fresh.setdefault(key, deque()).append(slot)

    async def _expire(self) -> None:
        """Every few seconds: drop containers idle longer than the TTL, replace dead ones."""
        ttl = self._config.idle_ttl_seconds or float("inf")
        while not self._closed:
            await asyncio.sleep(2.0)
            now = time.monotonic()
            for lists in (self._fresh, self._used):
                for key, slots in lists.items():
                    for slot in list(slots):
                        if now - slot.idle_since > ttl:
                            slots.remove(slot)
                            self._drop(slot)
                            if not slots:
                                self._keys.discard(key)  # not wanted lately: filled again on demand
                        elif not self._alive(slot):
                            _log.warning(
                                "pool: container %s died while idle; replacing it", slot.container_id[:12]
                            )
                            slots.remove(slot)
                            self._drop(slot)
                            self._kick(key)

    def _drop(self, slot: Slot) -> None:
        task = asyncio.ensure_future(self._discard(slot))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def idle(self) -> Iterator[Slot]:
        for slots in (*self._fresh.values(), *self._used.values()):
            yield from slots

    def forget(self, slot: Slot) -> bool:
        """Take an idle ``slot`` out (it died); True when it was idle here."""
        for lists in (self._fresh, self._used):
            slots = lists.get(slot.key)
            if slots is not None and slot in slots:
                slots.remove(slot)
                self._kick(slot.key)
                return True
        return False

    async def close(self) -> None:
        """Stop filling; remove every idle container; wait for removals in flight."""
        self._closed = True
        for task in (*self._filler.values(), *([self._expiry] if self._expiry else [])):
            task.cancel()
        await asyncio.gather(
            *self._filler.values(), *([self._expiry] if self._expiry else []), return_exceptions=True
        )
        for slots in (*self._fresh.values(), *self._used.values()):
            while slots:
                self._drop(slots.popleft())
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
