"""Typed configuration, parsed once from TOML; every error names the file, the key and what was expected."""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from expbuild_worker.errors import ConfigError
from expbuild_worker.model import ResourceLimits
from expbuild_worker.validation import MAX_WORK_ROOT_BYTES

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["text", "json"]
LogLimitPolicy = Literal["truncate", "end-action"]
PullPolicy = Literal["always", "if-not-present", "never"]
IoMode = Literal["bind", "archive"]
"""How an action's directory reaches its container: bind-mounted, or copied in and out as archives."""
IoModeSetting = Literal["auto", IoMode]
"""The configured choice: an :data:`IoMode`, or ``auto`` (bind when the Docker daemon is local)."""
CgroupMode = Literal["auto", "off", "required"]
AgentMode = Literal["auto", "on", "off"]

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenConfig:
    """[[server.tokens]]: one bearer token callers may present, read from ``file``; its ``name``
    appears in the action log of every action the caller runs."""

    name: str = ""
    file: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    """[server]: where the gRPC server listens and how it shuts down."""

    address: str = "127.0.0.1"
    port: int = 50051
    log_level: LogLevel = "info"
    log_format: LogFormat = "text"
    max_request_bytes: int = 64 * MiB
    shutdown_grace_seconds: float = 10.0
    health_check_interval_seconds: float = 10.0
    worker_id: str = ""
    tls_certificate_file: str = ""
    tls_private_key_file: str = ""
    tls_client_ca_file: str = ""
    tokens: tuple[TokenConfig, ...] = ()
    allow_insecure_remote: bool = False

    @property
    def tls(self) -> bool:
        return bool(self.tls_certificate_file)


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecutionConfig:
    """[execution]: admission, timeouts and per-action caps, for every executor."""

    default_executor: str = ""
    max_concurrent_executions: int = 4
    max_queued_executions: int = 64
    default_timeout_seconds: float = 3600.0
    max_timeout_seconds: float = 86400.0
    max_inline_input_bytes: int = 16 * MiB
    max_log_bytes_per_stream: int = 64 * MiB
    max_output_bytes: int = 4 * GiB
    on_log_limit: LogLimitPolicy = "truncate"
    staging_timeout_seconds: float = 600.0
    max_input_entries: int = 200_000
    max_digests_per_request: int = 100_000
    disk_check_interval_seconds: float = 0.5
    work_root: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """[storage]: the content-addressed store of uploaded blobs and collected outputs."""

    path: str = ""
    max_bytes: int = 10 * GiB
    output_retention_seconds: float = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerApiConfig:
    """[worker_api]: the own API, expbuild.worker.v1.WorkerService, on the server's port."""

    enabled: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class MetricsConfig:
    """[metrics]: Prometheus metrics over HTTP, on an address of their own."""

    enabled: bool = False
    address: str = "127.0.0.1"
    port: int = 9464


@dataclass(frozen=True, slots=True, kw_only=True)
class ReapiConfig:
    """[reapi]: the Remote Execution API v2 (executor, CAS and action cache) on the server's port."""

    enabled: bool = True
    instance_name: str = ""
    action_cache_path: str = ""
    action_cache_max_entries: int = 100_000
    action_cache_max_bytes: int = 1 * GiB


@dataclass(frozen=True, slots=True, kw_only=True)
class BotConfig:
    """[bot]: take leases from a Remote Workers API scheduler (BuildGrid) as a bot, over the same engine."""

    enabled: bool = False
    scheduler: str = ""
    cas: str = ""
    instance_name: str = ""
    bot_id: str = ""
    capacity: int = 0
    container_images: tuple[str, ...] = ()
    poll_timeout_seconds: float = 30.0
    reconnect_max_seconds: float = 30.0
    fetch_parallelism: int = 8
    max_batch_bytes: int = 2 * MiB
    tls_ca_file: str = ""
    tls_client_cert_file: str = ""
    tls_client_key_file: str = ""
    access_token_file: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    """Resource limits in a config table; 0 means unset (no default, or no maximum)."""

    cpu_cores: float = 0.0
    memory_bytes: int = 0
    max_processes: int = 0
    disk_bytes: int = 0

    def to_limits(self) -> ResourceLimits:
        """These limits as the executors take them: 0 (unset here) is None there."""
        return ResourceLimits(
            cpu_cores=self.cpu_cores or None,
            memory_bytes=self.memory_bytes or None,
            max_processes=self.max_processes or None,
            disk_bytes=self.disk_bytes or None,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DockerPoolConfig:
    """[executor.NAME.pool]: containers started ahead of need, per container shape."""

    enabled: bool = False
    min_idle: int = 1
    max_size: int = 2
    idle_ttl_seconds: float = 300.0
    idle_command: tuple[str, ...] = ("sleep", "2147483647")
    max_uses: int = 100
    agent: AgentMode = "auto"  # enter pool containers through the in-container agent, not the engine's exec
    agent_path: str = ""  # the agent binary; empty: the one `make agent` builds inside the package


@dataclass(frozen=True, slots=True, kw_only=True)
class HostExecutorConfig:
    """[executor.NAME] with type = "host": a plain process in a private directory."""

    type: Literal["host"] = "host"
    max_concurrency: int = 0
    kill_grace_seconds: float = 2.0
    refuse_unenforceable_limits: bool = True
    cgroups: CgroupMode = "auto"
    cgroup_parent: str = "expbuild"
    reuse_cgroups: bool = True  # cgroup v1: keep an action's cgroup for a later one once proven clean
    run_as_user: str = "nobody"
    run_as_group: str = "nogroup"
    run_as_root: bool = False
    run_as_uid_range: str = ""  # "FIRST-LAST": a uid (and gid) of its own per running action
    default_limits: LimitsConfig = field(default_factory=LimitsConfig)
    max_limits: LimitsConfig = field(default_factory=LimitsConfig)


@dataclass(frozen=True, slots=True, kw_only=True)
class DockerExecutorConfig:
    """[executor.NAME] with type = "docker": a hardened container per action."""

    type: Literal["docker"] = "docker"
    docker_host: str = ""
    image: str = ""
    pull_policy: PullPolicy = "if-not-present"
    always_pull: bool | None = None
    allowed_images: tuple[str, ...] = ()
    warmup_images: tuple[str, ...] = ()
    network_mode: str = "none"
    network_mode_when_enabled: str = ""
    readonly_rootfs: bool = True
    mount_tmpfs: bool = True
    tmpfs_size_bytes: int = 256 * MiB
    security_opts: tuple[str, ...] = ("no-new-privileges",)
    seccomp_profile: str = ""
    drop_all_capabilities: bool = True
    user: str = "65534:65534"
    init: bool = True
    runtime: str = ""
    ulimits_nofile: int = 0
    ulimits_nproc: int = 0
    io_mode: IoModeSetting = "auto"
    max_concurrency: int = 0
    kill_grace_seconds: float = 1.0
    cgroup_parent: str = "expbuild"
    orphan_sweep_interval_seconds: float = 60.0
    default_limits: LimitsConfig = field(
        default_factory=lambda: LimitsConfig(cpu_cores=1.0, memory_bytes=2 * GiB, max_processes=1024)
    )
    max_limits: LimitsConfig = field(default_factory=LimitsConfig)
    pool: DockerPoolConfig = field(default_factory=DockerPoolConfig)

    @property
    def effective_pull_policy(self) -> PullPolicy:
        """``always_pull`` (the older spelling) maps onto the pull policy when set."""
        if self.always_pull is None:
            return self.pull_policy
        return "always" if self.always_pull else self.pull_policy


SANDBOX_ROOT_PATHS = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc/alternatives",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/localtime",
    "/etc/ssl/certs",
)
"""The host paths a sandbox sees read-only by default: the toolchain and libraries, and the part
of /etc that programs read to start (the loader's cache, users and groups, alternatives), never
the rest of /etc (keys, daemon configuration). Paths missing on the host are left out."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SandboxExecutorConfig:
    """[executor.NAME] with type = "sandbox": a process in its own namespaces, made by bubblewrap."""

    type: Literal["sandbox"] = "sandbox"
    bwrap: str = "bwrap"
    root_paths: tuple[str, ...] = SANDBOX_ROOT_PATHS
    work_directory: str = "/work"
    tmpfs_size_bytes: int = 256 * MiB
    allow_network: bool = False
    hostname: str = "sandbox"
    max_concurrency: int = 0
    kill_grace_seconds: float = 2.0
    refuse_unenforceable_limits: bool = True
    cgroups: CgroupMode = "auto"
    cgroup_parent: str = "expbuild"
    reuse_cgroups: bool = True  # cgroup v1: keep an action's cgroup for a later one once proven clean
    run_as_user: str = "nobody"
    run_as_group: str = "nogroup"
    run_as_root: bool = False
    run_as_uid_range: str = ""  # "FIRST-LAST": a uid (and gid) of its own per running action
    default_limits: LimitsConfig = field(default_factory=LimitsConfig)
    max_limits: LimitsConfig = field(default_factory=LimitsConfig)


ExecutorConfig = HostExecutorConfig | SandboxExecutorConfig | DockerExecutorConfig

_EXECUTOR_TYPES: dict[str, type[ExecutorConfig]] = {
    "host": HostExecutorConfig,
    "sandbox": SandboxExecutorConfig,
    "docker": DockerExecutorConfig,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerConfig:
    """The whole configuration. ``executors`` keeps file order; the first is the default."""

    source: str = "<defaults>"
    server: ServerConfig = field(default_factory=ServerConfig)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    worker_api: WorkerApiConfig = field(default_factory=WorkerApiConfig)
    reapi: ReapiConfig = field(default_factory=ReapiConfig)
    bot: BotConfig = field(default_factory=BotConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    executors: Mapping[str, ExecutorConfig] = field(default_factory=lambda: {"host": HostExecutorConfig()})

    @property
    def default_executor(self) -> str:
        return self.execution.default_executor or next(iter(self.executors))


def load_config(path: str | Path) -> WorkerConfig:
    """Read and validate a TOML config file; raises ConfigError naming file and key."""
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError as err:
        raise ConfigError(f"{source}: file not found") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    return parse_config(raw, source=source)


def parse_config(raw: Mapping[str, Any], *, source: str = "<config>") -> WorkerConfig:
    """Validate an already-decoded TOML document."""
    known = {"server", "execution", "storage", "worker_api", "reapi", "bot", "metrics", "executor"}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}; expected one of {sorted(known)}")
    server = _parse_table(ServerConfig, raw.get("server", {}), source, "server")
    execution = _parse_table(ExecutionConfig, raw.get("execution", {}), source, "execution")
    storage = _parse_table(StorageConfig, raw.get("storage", {}), source, "storage")
    worker_api = _parse_table(WorkerApiConfig, raw.get("worker_api", {}), source, "worker_api")
    reapi = _parse_table(ReapiConfig, raw.get("reapi", {}), source, "reapi")
    bot = _parse_table(BotConfig, raw.get("bot", {}), source, "bot")
    metrics = _parse_table(MetricsConfig, raw.get("metrics", {}), source, "metrics")
    executors_raw = raw.get("executor", {"host": {"type": "host"}})
    if not isinstance(executors_raw, Mapping) or not executors_raw:
        raise ConfigError(f"{source}: [executor] must hold at least one [executor.NAME] table")
    executors: dict[str, ExecutorConfig] = {}
    for name, table in executors_raw.items():
        where = f"executor.{name}"
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: {where}: expected a table")
        kind = table.get("type")
        if kind not in _EXECUTOR_TYPES:
            raise ConfigError(
                f"{source}: {where}.type: expected one of {sorted(_EXECUTOR_TYPES)}, got {kind!r}"
            )
        executors[name] = _parse_table(_EXECUTOR_TYPES[kind], table, source, where)
    config = WorkerConfig(
        source=source,
        server=server,
        execution=execution,
        storage=storage,
        worker_api=worker_api,
        reapi=reapi,
        bot=bot,
        metrics=metrics,
        executors=executors,
    )
    _check_semantics(config)
    return config


_LIMIT_KEYS = ("cpu_cores", "memory_bytes", "max_processes", "disk_bytes")


def _check_semantics(config: WorkerConfig) -> None:
    src = config.source
    if config.execution.default_executor and config.execution.default_executor not in config.executors:
        raise ConfigError(
            f"{src}: execution.default_executor: expected one of {sorted(config.executors)}, "
            f"got {config.execution.default_executor!r}"
        )
    positive: list[tuple[str, float]] = [
        ("server.max_request_bytes", config.server.max_request_bytes),
        ("server.health_check_interval_seconds", config.server.health_check_interval_seconds),
        ("execution.max_concurrent_executions", config.execution.max_concurrent_executions),
        ("execution.default_timeout_seconds", config.execution.default_timeout_seconds),
        ("execution.max_timeout_seconds", config.execution.max_timeout_seconds),
        ("execution.max_log_bytes_per_stream", config.execution.max_log_bytes_per_stream),
        ("execution.max_output_bytes", config.execution.max_output_bytes),
        ("storage.max_bytes", config.storage.max_bytes),
        ("execution.staging_timeout_seconds", config.execution.staging_timeout_seconds),
        ("execution.max_input_entries", config.execution.max_input_entries),
        ("execution.max_digests_per_request", config.execution.max_digests_per_request),
        ("execution.disk_check_interval_seconds", config.execution.disk_check_interval_seconds),
        ("reapi.action_cache_max_entries", config.reapi.action_cache_max_entries),
        ("reapi.action_cache_max_bytes", config.reapi.action_cache_max_bytes),
    ]
    non_negative: list[tuple[str, float]] = [
        ("server.shutdown_grace_seconds", config.server.shutdown_grace_seconds),
        ("execution.max_queued_executions", config.execution.max_queued_executions),
        ("execution.max_inline_input_bytes", config.execution.max_inline_input_bytes),
        ("storage.output_retention_seconds", config.storage.output_retention_seconds),
    ]
    for name, ex in config.executors.items():
        for table in ("default_limits", "max_limits"):
            limits: LimitsConfig = getattr(ex, table)
            for key in _LIMIT_KEYS:
                non_negative.append((f"executor.{name}.{table}.{key}", getattr(limits, key)))
        non_negative.append((f"executor.{name}.max_concurrency", ex.max_concurrency))
        positive.append((f"executor.{name}.kill_grace_seconds", ex.kill_grace_seconds))
    for key, value in positive:
        if value <= 0:
            raise ConfigError(f"{src}: {key}: expected a positive number, got {value!r}")
    for key, value in non_negative:
        if value < 0:
            raise ConfigError(f"{src}: {key}: expected zero or a positive number, got {value!r}")
    for name, ex in config.executors.items():
        for key in _LIMIT_KEYS:
            default, maximum = getattr(ex.default_limits, key), getattr(ex.max_limits, key)
            if default and maximum and default > maximum:
                raise ConfigError(
                    f"{src}: executor.{name}.default_limits.{key}: expected at most max_limits.{key} "
                    f"({maximum}), got {default}"
                )
    work_root = config.execution.work_root
    if work_root and len(os.path.abspath(work_root).encode()) > MAX_WORK_ROOT_BYTES:
        raise ConfigError(
            f"{src}: execution.work_root: expected at most {MAX_WORK_ROOT_BYTES} bytes as an absolute path, "
            "so that every action path fits the kernel's path limit"
        )
    if not (config.worker_api.enabled or config.reapi.enabled):
        raise ConfigError(f"{src}: worker_api.enabled, reapi.enabled: at least one way in must be enabled")
    _check_server_security(config)
    if not 0 <= config.server.port <= 65535:
        raise ConfigError(f"{src}: server.port: expected 0-65535, got {config.server.port}")
    if not 0 <= config.metrics.port <= 65535:
        raise ConfigError(f"{src}: metrics.port: expected 0-65535, got {config.metrics.port}")
    if config.execution.default_timeout_seconds > config.execution.max_timeout_seconds:
        raise ConfigError(
            f"{src}: execution.default_timeout_seconds: expected at most max_timeout_seconds "
            f"({config.execution.max_timeout_seconds}), got {config.execution.default_timeout_seconds}"
        )


def _check_server_security(config: WorkerConfig) -> None:
    src, server = config.source, config.server
    if bool(server.tls_certificate_file) != bool(server.tls_private_key_file):
        raise ConfigError(
            f"{src}: server.tls_certificate_file, server.tls_private_key_file: give both or neither"
        )
    if server.tls_client_ca_file and not server.tls:
        raise ConfigError(f"{src}: server.tls_client_ca_file: needs server.tls_certificate_file too")
    names: set[str] = set()
    for i, token in enumerate(server.tokens):
        if not token.name or not token.file:
            raise ConfigError(f"{src}: server.tokens[{i}]: expected both name and file")
        if token.name in names:
            raise ConfigError(f"{src}: server.tokens[{i}].name: {token.name!r} is used twice")
        names.add(token.name)


def _parse_table(cls: type[Any], table: Any, source: str, where: str) -> Any:
    """Build dataclass ``cls`` from a TOML table, rejecting unknown keys and wrong types."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{source}: {where}: expected a table, got {type(table).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in table.items():
        if key not in fields:
            raise ConfigError(f"{source}: {where}: unknown key {key!r}; expected one of {sorted(fields)}")
        values[key] = _coerce(hints[key], value, source, f"{where}.{key}")
    return cls(**values)


def _coerce(hint: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {key}: expected one of {list(args)}, got {value!r}")
        return value
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _coerce(candidate, value, source, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(args[0], item, source, f"{key}[{i}]") for i, item in enumerate(value))
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _parse_table(hint, value, source, key)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{source}: {key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported setting type {hint!r}")  # pragma: no cover
