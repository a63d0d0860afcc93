"""The composition root: the one function that turns parsed configuration into running parts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import grp
import logging
import os
import pwd
import re
import socket
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from expbuild_worker.client import (
    ChannelSecurity,
    channel_credentials,
    open_channel,
    read_token,
    token_metadata,
)
from expbuild_worker.config import (
    DockerExecutorConfig,
    ExecutorConfig,
    HostExecutorConfig,
    SandboxExecutorConfig,
    WorkerConfig,
)
from expbuild_worker.engine import (
    ActionDirectories,
    ActionLogRunner,
    ActionMetrics,
    ActionRunner,
    Admission,
    DirectoryLock,
    EngineCollector,
    EngineLimits,
    ExecutionEngine,
    ExecutionIdRunner,
    LocalActionRunner,
    LogCapturingRunner,
    MetricsRunner,
    RunnerLimits,
    TimestampingRunner,
)
from expbuild_worker.errors import ConfigError
from expbuild_worker.execution.decorators import (
    DeadlineExecutor,
    DiskLimitingExecutor,
    LogLimitingExecutor,
)
from expbuild_worker.execution.executor import Executor
from expbuild_worker.frontdoors import FrontDoor
from expbuild_worker.frontdoors.reapi import build_reapi_storage_services
from expbuild_worker.frontdoors.worker_v1 import AdvertisedLimits, WorkerApiFrontDoor
from expbuild_worker.storage import ActionCache, ContentAddressedStore

if TYPE_CHECKING:
    from expbuild_worker.frontdoors.bot import Bot

_log = logging.getLogger(__name__)

MAX_SEND_BYTES = 16 << 20
"""gRPC's send limit, raised when a FindMissingBlobs reply at the configured cap needs more."""
DIGEST_REPLY_BYTES = 80
"""The most one missing digest adds to a reply: tag and length (2), sha256 (2 + 64) and a
size of up to 2**63 - 1 (1 + 9)."""


def send_limit(config: WorkerConfig) -> int:
    """gRPC's send limit: large enough for any reply, a FindMissingBlobs reply at the cap
    included (every digest missing)."""
    digests = config.execution.max_digests_per_request * DIGEST_REPLY_BYTES + 1024
    return max(MAX_SEND_BYTES, digests)


POOL_THREADS = 4
"""Threads for the front doors' blocking calls (store I/O, large translations): a few uploads and
lookups proceed at once, and a flood of requests queues instead of spawning threads that would
only contend for the disk and the interpreter lock."""


@dataclass(frozen=True, slots=True)
class Worker:
    """The engine, its store and executors, and every enabled front door, built and started."""

    worker_id: str
    engine: ExecutionEngine
    store: ContentAddressedStore
    executors: Mapping[str, Executor]
    front_doors: tuple[FrontDoor, ...]
    pool: concurrent.futures.ThreadPoolExecutor
    metrics: CollectorRegistry | None = None
    """This worker's own metrics registry when [metrics] is enabled (never the process-wide one)."""

    async def shutdown(self, grace_seconds: float) -> None:
        """Finish or cancel actions (see ``ExecutionEngine.shutdown``), then release the front doors."""
        await self.engine.shutdown(grace_seconds)
        for door in self.front_doors:
            try:
                await door.close()
            except Exception:
                _log.exception("closing front door %s failed", door.name)
        self.pool.shutdown(wait=False, cancel_futures=True)


def _build_executor(name: str, config: ExecutorConfig, *, worker_id: str, capacity: int = 0) -> Executor:
    if isinstance(config, HostExecutorConfig):
        from expbuild_worker.execution.host import HostExecutor  # noqa: PLC0415 - import only what is configured

        return HostExecutor(
            name=name,
            kill_grace_seconds=config.kill_grace_seconds,
            refuse_unenforceable_limits=config.refuse_unenforceable_limits,
            default_limits=config.default_limits.to_limits(),
            max_limits=config.max_limits.to_limits(),
            cgroups=config.cgroups,
            cgroup_parent=config.cgroup_parent,
            reuse_cgroups=config.reuse_cgroups,
            worker_id=worker_id,
            run_as=_action_user(name, config),
            run_as_uids=_action_uids(name, config, capacity=capacity),
        )
    if isinstance(config, SandboxExecutorConfig):
        from expbuild_worker.execution.sandbox import SandboxExecutor  # noqa: PLC0415 - import only what is configured

        return SandboxExecutor(
            name=name,
            bwrap=config.bwrap,
            root_paths=config.root_paths,
            work_directory=config.work_directory,
            tmpfs_size_bytes=config.tmpfs_size_bytes,
            allow_network=config.allow_network,
            hostname=config.hostname,
            kill_grace_seconds=config.kill_grace_seconds,
            refuse_unenforceable_limits=config.refuse_unenforceable_limits,
            default_limits=config.default_limits.to_limits(),
            max_limits=config.max_limits.to_limits(),
            cgroups=config.cgroups,
            cgroup_parent=config.cgroup_parent,
            reuse_cgroups=config.reuse_cgroups,
            worker_id=worker_id,
            run_as=_action_user(name, config),
            run_as_uids=_action_uids(name, config, capacity=capacity),
        )
    assert isinstance(config, DockerExecutorConfig)
    from expbuild_worker.execution.docker import build_docker_executor  # noqa: PLC0415 - loads the Docker SDK

    return build_docker_executor(name=name, config=config, worker_id=worker_id, capacity=capacity)


def _action_user(name: str, config: HostExecutorConfig | SandboxExecutorConfig) -> tuple[int, int] | None:
    """The (uid, gid) a root worker's host and sandbox actions run as; None when the worker is not root
    (actions are its own user then) or ``run_as_root`` is said explicitly."""
    if os.geteuid() != 0 or config.run_as_root:
        return None
    where = f"executor.{name}"
    user, group = config.run_as_user, config.run_as_group
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ConfigError(f"{where}.run_as_user: no user {user!r} on this host") from None
    try:
        gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"{where}.run_as_group: no group {group!r} on this host") from None
    if uid == 0 or gid == 0:
        raise ConfigError(f"{where}.run_as_user: must not be root; say run_as_root = true instead")
    return uid, gid


def _action_uids(
    name: str, config: HostExecutorConfig | SandboxExecutorConfig, *, capacity: int
) -> range | None:
    """The uids of ``run_as_uid_range`` ("FIRST-LAST") for a root worker: each running action
    gets one of its own (its gid the same number), so concurrent actions cannot signal each
    other or enter each other's directories. None when not set, not root, or ``run_as_root``."""
    text = config.run_as_uid_range.strip()
    if not text or os.geteuid() != 0 or config.run_as_root:
        return None
    where = f"executor.{name}.run_as_uid_range"
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if match is None:
        raise ConfigError(f"{where}: expected FIRST-LAST, two uids such as 200000-200063; got {text!r}")
    first, last = int(match[1]), int(match[2])
    if not 1 <= first <= last <= _MAX_UID:
        raise ConfigError(f"{where}: needs 1 <= FIRST <= LAST <= {_MAX_UID}; got {text!r}")
    uids = range(first, last + 1)
    slots = config.max_concurrency or capacity
    if slots and len(uids) < slots:
        raise ConfigError(
            f"{where}: {len(uids)} uid(s) for up to {slots} concurrent actions; give at least one per slot"
        )
    for entry in pwd.getpwall():
        if entry.pw_uid in uids:
            raise ConfigError(
                f"{where}: uid {entry.pw_uid} belongs to user {entry.pw_name!r}; "
                "the range must hold unused uids"
            )
    return uids


_MAX_UID = (1 << 32) - 2
"""The largest valid uid ((uid_t) -1 means "unchanged" to the kernel)."""


def _check_reachable(work_root: Path, user: tuple[int, int], source: str) -> None:
    """Refuse a work root the action user cannot reach: commands that name their own directory
    by its full path (``$PWD``, ``/proc/self/cwd``) would fail in ways that look like their fault."""
    uid, gid = user
    for directory in [work_root, *work_root.parents]:
        try:
            st = directory.stat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid:
            ok = bool(st.st_mode & 0o100)
        elif st.st_gid == gid:
            ok = bool(st.st_mode & 0o010)
        else:
            ok = bool(st.st_mode & 0o001)
        if not ok:
            raise ConfigError(
                f"{source}: execution.work_root: {directory} (mode {st.st_mode & 0o7777:o}) is not "
                f"searchable by uid {uid}, the user host actions run as; allow others to search it "
                "(chmod o+x) or choose another work_root"
            )


def _id_lock_directory() -> Path:
    """Where worker ids are claimed: one place every worker on the host sees. A root worker uses
    /run (a service's private /tmp would hide one worker's claim from another); others the
    system's temporary directory."""
    if os.geteuid() == 0:
        shared = Path("/run/expbuild-worker/ids")
        try:
            shared.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # a read-only /run (a sandboxed service without its runtime directory)
        else:
            return shared
    return Path(tempfile.gettempdir()) / "expbuild-worker" / ".ids"


def worker_id_of(config: WorkerConfig) -> str:
    return config.server.worker_id or socket.gethostname()


def work_root_of(config: WorkerConfig) -> Path:
    """The configured work root, else one per worker id under the system's temporary directory,
    so that two workers with different ids never share one by default."""
    if config.execution.work_root:
        return Path(config.execution.work_root)
    return Path(tempfile.gettempdir()) / "expbuild-worker" / _file_name(worker_id_of(config))


def _file_name(worker_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", worker_id).lstrip(".") or "worker"


def _claim_directories(config: WorkerConfig, work_root: Path) -> list[DirectoryLock]:
    """Lock the worker id on this host, the work root, and the store and action cache when they
    live elsewhere, before anything is swept. Two workers with one id would remove each other's
    cgroups and containers (both are named by the id), so the id is claimed even when the
    configured directories differ."""
    worker_id = worker_id_of(config)
    ids = _id_lock_directory()
    claims: list[tuple[Path, str, str, str | None]] = [
        (ids / _file_name(worker_id), "worker id", "server.worker_id", f"{worker_id!r} on this host"),
        (work_root, "work root", "execution.work_root", None),
    ]
    if config.storage.path:
        claims.append((Path(config.storage.path), "store", "storage.path", None))
    if config.reapi.enabled and config.reapi.action_cache_path:
        claims.append((Path(config.reapi.action_cache_path), "action cache", "reapi.action_cache_path", None))
    locks: list[DirectoryLock] = []
    try:
        for directory, what, key, shown in claims:
            locks.append(DirectoryLock(directory, what=what, config_key=key, shown=shown))
    except BaseException:
        for lock in locks:
            lock.release()
        raise
    return locks


async def build_worker(config: WorkerConfig) -> Worker:
    """Claim the work root, then build the store, the decorated executors and the engine, and start them."""
    worker_id = worker_id_of(config)
    work_root = work_root_of(config)
    locks = await asyncio.to_thread(_claim_directories, config, work_root)
    executors: dict[str, Executor] = {}
    try:
        store = await asyncio.to_thread(
            ContentAddressedStore,
            root=Path(config.storage.path) if config.storage.path else work_root / "cas",
            max_bytes=config.storage.max_bytes,
        )
        for name, ex_config in config.executors.items():
            if isinstance(ex_config, HostExecutorConfig | SandboxExecutorConfig) and (
                user := _action_user(name, ex_config)
            ):
                uids = _action_uids(name, ex_config, capacity=config.execution.max_concurrent_executions)
                _check_reachable(work_root, (uids[0], uids[0]) if uids else user, config.source)
            executor = _build_executor(
                name, ex_config, worker_id=worker_id, capacity=config.execution.max_concurrent_executions
            )
            executors[name] = DeadlineExecutor(
                DiskLimitingExecutor(
                    LogLimitingExecutor(
                        executor,
                        max_bytes_per_stream=config.execution.max_log_bytes_per_stream,
                        end_action=config.execution.on_log_limit == "end-action",
                    ),
                    interval_seconds=config.execution.disk_check_interval_seconds,
                )
            )
            start = getattr(executor, "start", None)
            if start is not None:
                await start()
        # A registry per worker, never the process-wide default: workers in one process stay apart.
        metrics = CollectorRegistry(auto_describe=True) if config.metrics.enabled else None
        engine = _build_engine(config, executors, store, work_root, locks, metrics=metrics)
        await engine.start()
        pool = concurrent.futures.ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="expbuild-io")
        front_doors = await _build_front_doors(
            config, engine=engine, store=store, worker_id=worker_id, work_root=work_root, pool=pool
        )
    except BaseException:
        # A worker that cannot start leaves nothing running or made (cgroups, spares) behind.
        for started in executors.values():
            with contextlib.suppress(Exception):
                await started.close()
        for lock in locks:
            lock.release()
        raise
    return Worker(
        worker_id=worker_id,
        engine=engine,
        store=store,
        executors=executors,
        front_doors=front_doors,
        pool=pool,
        metrics=metrics,
    )


async def _build_front_doors(
    config: WorkerConfig,
    *,
    engine: ExecutionEngine,
    store: ContentAddressedStore,
    worker_id: str,
    work_root: Path,
    pool: concurrent.futures.Executor,
) -> tuple[FrontDoor, ...]:
    """Every enabled way in, over the one engine; all are served on the server's one port."""
    doors: list[FrontDoor] = []
    if config.worker_api.enabled:
        doors.append(
            WorkerApiFrontDoor(
                engine=engine,
                worker_id=worker_id,
                limits=AdvertisedLimits(
                    max_request_bytes=config.server.max_request_bytes,
                    max_inline_input_bytes=config.execution.max_inline_input_bytes,
                    max_log_bytes_per_stream=config.execution.max_log_bytes_per_stream,
                    max_output_bytes=config.execution.max_output_bytes,
                    default_timeout_seconds=config.execution.default_timeout_seconds,
                    max_timeout_seconds=config.execution.max_timeout_seconds,
                ),
                pool=pool,
                max_input_entries=config.execution.max_input_entries,
                max_digests_per_request=config.execution.max_digests_per_request,
            )
        )
    if config.reapi.enabled:
        action_cache = await asyncio.to_thread(
            ActionCache,
            root=Path(config.reapi.action_cache_path) if config.reapi.action_cache_path else work_root / "ac",
            max_entries=config.reapi.action_cache_max_entries,
            max_bytes=config.reapi.action_cache_max_bytes,
        )
        try:
            doors.append(
                build_reapi_storage_services(
                    store=store,
                    action_cache=action_cache,
                    instance_name=config.reapi.instance_name,
                    max_message_bytes=min(config.server.max_request_bytes, send_limit(config)),
                    max_digests_per_request=config.execution.max_digests_per_request,
                    exec_enabled=True,
                    engine=engine,
                    worker_name=worker_id,
                    max_input_entries=config.execution.max_input_entries,
                    pool=pool,
                    result_blobs_kept_seconds=config.storage.output_retention_seconds,
                )
            )
        except ValueError as err:
            raise ConfigError(f"{config.source}: reapi: {err}") from err
    return tuple(doors)


def _build_engine(
    config: WorkerConfig,
    executors: Mapping[str, Executor],
    store: ContentAddressedStore,
    work_root: Path,
    locks: Sequence[DirectoryLock],
    *,
    metrics: CollectorRegistry | None = None,
) -> ExecutionEngine:
    """The engine and its action runner: the local runner, its decorators outermost last.

    With a metrics registry, the action metrics are counted from each result and the engine's
    running, queued and refused counts are read at every scrape."""
    runner: ActionRunner = LocalActionRunner(
        store=store,
        directories=ActionDirectories(root=work_root / "actions"),
        limits=RunnerLimits(
            max_output_bytes=config.execution.max_output_bytes,
            default_timeout_seconds=config.execution.default_timeout_seconds,
            staging_timeout_seconds=config.execution.staging_timeout_seconds,
            output_retention_seconds=config.storage.output_retention_seconds,
        ),
    )
    runner = LogCapturingRunner(
        runner, store=store, retention_seconds=config.storage.output_retention_seconds
    )
    runner = ActionLogRunner(TimestampingRunner(runner))
    if metrics is not None:
        runner = MetricsRunner(runner, metrics=ActionMetrics(metrics))
    runner = ExecutionIdRunner(runner)  # outermost: every decorator's lines name the action too
    engine = ExecutionEngine(
        executors=executors,
        default_executor=config.default_executor,
        store=store,
        runner=runner,
        limits=EngineLimits(
            max_inline_input_bytes=config.execution.max_inline_input_bytes,
            max_timeout_seconds=config.execution.max_timeout_seconds,
            max_input_entries=config.execution.max_input_entries,
        ),
        admission=Admission(
            max_running=config.execution.max_concurrent_executions,
            max_queued=config.execution.max_queued_executions,
            per_executor={name: ex.max_concurrency for name, ex in config.executors.items()},
        ),
        directory_locks=locks,
    )
    if metrics is not None:
        metrics.register(EngineCollector(engine, tuple(executors)))
    return engine


_BOT_SCHEMES = ("grpc://", "http://")
"""Scheduler addresses the bot connects to in plain text (or HOST:PORT alone)."""


def _bot_target(address: str, key: str, source: str) -> str:
    """HOST:PORT from ``grpc://HOST:PORT`` (or a bare HOST:PORT); ConfigError naming ``key`` otherwise."""
    target = address
    for scheme in _BOT_SCHEMES:
        if address.startswith(scheme):
            target = address[len(scheme) :]
            break
    else:
        if "://" in address:
            raise ConfigError(
                f"{source}: {key}: {address!r}: only grpc://HOST:PORT is supported (TLS to the "
                "scheduler is not yet supported)"
            )
    host, sep, port = target.rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{source}: {key}: expected grpc://HOST:PORT, got {address!r}")
    return target.rstrip("/")


def check_bot_config(config: WorkerConfig) -> None:
    """Refuse a [bot] table the bot could not work with, naming the key; before anything is built."""
    bot, src = config.bot, config.source
    if not bot.scheduler:
        raise ConfigError(f"{src}: bot.scheduler: expected the scheduler's address (grpc://HOST:PORT)")
    if bool(bot.tls_client_cert_file) != bool(bot.tls_client_key_file):
        raise ConfigError(f"{src}: bot.tls_client_cert_file, bot.tls_client_key_file: give both or neither")
    for key in ("tls_ca_file", "tls_client_cert_file", "tls_client_key_file", "access_token_file"):
        path = getattr(bot, key)
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{src}: bot.{key}: cannot read {path}")
    for key, value in (
        ("bot.capacity", bot.capacity),
        ("bot.poll_timeout_seconds", bot.poll_timeout_seconds),
        ("bot.reconnect_max_seconds", bot.reconnect_max_seconds),
        ("bot.fetch_parallelism", bot.fetch_parallelism),
        ("bot.max_batch_bytes", bot.max_batch_bytes),
    ):
        if value < 0 or (value == 0 and key != "bot.capacity"):
            raise ConfigError(f"{src}: {key}: expected a positive number, got {value!r}")
    if bot.poll_timeout_seconds < 5:
        raise ConfigError(
            f"{src}: bot.poll_timeout_seconds: expected at least 5 (BuildGrid assigns no work to a "
            f"call with under 3 s left), got {bot.poll_timeout_seconds}"
        )
    _bot_target(bot.scheduler, "bot.scheduler", src)
    if bot.cas:
        _bot_target(bot.cas, "bot.cas", src)


async def build_bot(config: WorkerConfig, worker: Worker) -> Bot:
    """The Remote Workers API bot of [bot] over ``worker``'s engine and store, not yet started.

    Its store fetches from the scheduler's CAS (``bot.cas``, else the scheduler's address) into
    the worker's store; it offers the platform properties of the worker's ready executors and
    the images in ``bot.container_images``; its capacity (``bot.capacity``, 0 = the worker's
    ``execution.max_concurrent_executions``) shares the one engine with any other front door.
    """
    import grpc  # noqa: PLC0415 - only a process that runs a bot opens channels to a scheduler

    from expbuild_worker.api.rwapi import bots_pb2_grpc  # noqa: PLC0415
    from expbuild_worker.frontdoors.bot import (  # noqa: PLC0415
        Bot,
        BotSettings,
        GrpcRemoteCas,
        LeaseWork,
        offered_properties,
    )
    from expbuild_worker.storage import RemoteStore  # noqa: PLC0415

    check_bot_config(config)
    bot = config.bot
    scheduler = _bot_target(bot.scheduler, "bot.scheduler", config.source)
    cas_target = _bot_target(bot.cas, "bot.cas", config.source) if bot.cas else scheduler
    capacity = bot.capacity or config.execution.max_concurrent_executions
    limit = min(config.server.max_request_bytes, send_limit(config))
    options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Reconnect soon after a scheduler comes back, not after gRPC's default two minutes.
        ("grpc.initial_reconnect_backoff_ms", 500),
        ("grpc.min_reconnect_backoff_ms", 500),
        ("grpc.max_reconnect_backoff_ms", int(bot.reconnect_max_seconds * 1000)),
    ]
    security = ChannelSecurity(
        ca_file=bot.tls_ca_file,
        certificate_file=bot.tls_client_cert_file,
        private_key_file=bot.tls_client_key_file,
        token_file=bot.access_token_file,
    )
    if security.tls:
        bots_channel = grpc.aio.secure_channel(scheduler, channel_credentials(security), options=options)
    else:
        bots_channel = grpc.aio.insecure_channel(scheduler, options=options)
    token = read_token(security)
    cas_channel = open_channel(cas_target, security, options=options)
    remote = GrpcRemoteCas(
        channel=cas_channel, instance_name=bot.instance_name, max_batch_bytes=bot.max_batch_bytes
    )
    store = RemoteStore(local=worker.store, remote=remote, parallelism=bot.fetch_parallelism)
    pool = concurrent.futures.ThreadPoolExecutor(capacity + 2, thread_name_prefix="expbuild-bot")
    properties = offered_properties(await worker.engine.capabilities(), bot.container_images)

    async def release() -> None:
        await bots_channel.close()
        store.close()
        cas_channel.close()
        pool.shutdown(wait=False, cancel_futures=True)

    bot_id = bot.bot_id or worker.worker_id
    return Bot(
        stub=bots_pb2_grpc.BotsStub(bots_channel),
        work=LeaseWork(
            engine=worker.engine,
            store=store,
            instance_name=bot.instance_name,
            worker_name=bot_id,
            pool=pool,
            max_input_entries=config.execution.max_input_entries,
        ),
        engine=worker.engine,
        settings=BotSettings(
            bot_id=bot_id,
            instance_name=bot.instance_name,
            capacity=capacity,
            properties=tuple(properties),
            poll_timeout_seconds=bot.poll_timeout_seconds,
            reconnect_max_seconds=bot.reconnect_max_seconds,
            call_metadata=token_metadata(token) if token else (),
        ),
        on_close=release,
    )
