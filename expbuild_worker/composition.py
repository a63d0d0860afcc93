"""The composition root: the one function that turns parsed configuration into running parts."""

from __future__ import annotations

import contextlib
import socket
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.config import (
    DockerExecutorConfig,
    ExecutorConfig,
    HostExecutorConfig,
    LimitsConfig,
    WorkerConfig,
)
from expbuild_worker.engine import Admission, EngineLimits, ExecutionEngine
from expbuild_worker.execution.decorators import DeadlineExecutor, LogLimitingExecutor
from expbuild_worker.execution.executor import Executor
from expbuild_worker.model import ResourceLimits
from expbuild_worker.storage import ContentAddressedStore


@dataclass(frozen=True, slots=True)
class Worker:
    """Everything a front door needs, built and started."""

    worker_id: str
    engine: ExecutionEngine
    store: ContentAddressedStore
    executors: Mapping[str, Executor]


def limits_from_config(limits: LimitsConfig) -> ResourceLimits:
    """Config uses 0 for "unset"; the engine uses None."""
    return ResourceLimits(
        cpu_cores=limits.cpu_cores or None,
        memory_bytes=limits.memory_bytes or None,
        max_processes=limits.max_processes or None,
        disk_bytes=limits.disk_bytes or None,
    )


def _build_executor(name: str, config: ExecutorConfig, *, worker_id: str) -> Executor:
    if isinstance(config, HostExecutorConfig):
        from expbuild_worker.execution.host import HostExecutor  # noqa: PLC0415 - import only what is configured

        return HostExecutor(
            name=name,
            kill_grace_seconds=config.kill_grace_seconds,
            refuse_unenforceable_limits=config.refuse_unenforceable_limits,
            default_limits=limits_from_config(config.default_limits),
            max_limits=limits_from_config(config.max_limits),
            cgroups=config.cgroups,
            cgroup_parent=config.cgroup_parent,
            worker_id=worker_id,
        )
    assert isinstance(config, DockerExecutorConfig)
    from expbuild_worker.execution.docker import build_docker_executor  # noqa: PLC0415 - loads the Docker SDK

    return build_docker_executor(name=name, config=config, worker_id=worker_id)


def work_root_of(config: WorkerConfig) -> Path:
    return Path(config.execution.work_root or Path(tempfile.gettempdir()) / "expbuild-worker")


async def build_worker(config: WorkerConfig) -> Worker:
    """Build the store, the decorated executors and the engine, and start them."""
    worker_id = config.server.worker_id or socket.gethostname()
    work_root = work_root_of(config)
    store = ContentAddressedStore(
        root=Path(config.storage.path) if config.storage.path else work_root / "cas",
        max_bytes=config.storage.max_bytes,
    )
    executors: dict[str, Executor] = {}
    try:
        for name, ex_config in config.executors.items():
            executor = _build_executor(name, ex_config, worker_id=worker_id)
            executors[name] = DeadlineExecutor(
                LogLimitingExecutor(executor, max_bytes_per_stream=config.execution.max_log_bytes_per_stream)
            )
            start = getattr(executor, "start", None)
            if start is not None:
                await start()
        engine = _build_engine(config, executors, store, work_root)
        await engine.start()
    except BaseException:
        # A worker that cannot start leaves nothing running or made (cgroups, spares) behind.
        for started in executors.values():
            with contextlib.suppress(Exception):
                await started.close()
        raise
    return Worker(worker_id=worker_id, engine=engine, store=store, executors=executors)


def _build_engine(
    config: WorkerConfig, executors: Mapping[str, Executor], store: ContentAddressedStore, work_root: Path
) -> ExecutionEngine:
    return ExecutionEngine(
        executors=executors,
        default_executor=config.default_executor,
        store=store,
        work_root=work_root,
        limits=EngineLimits(
            max_inline_input_bytes=config.execution.max_inline_input_bytes,
            max_output_bytes=config.execution.max_output_bytes,
            default_timeout_seconds=config.execution.default_timeout_seconds,
            max_timeout_seconds=config.execution.max_timeout_seconds,
        ),
        admission=Admission(
            max_running=config.execution.max_concurrent_executions,
            max_queued=config.execution.max_queued_executions,
            per_executor={name: ex.max_concurrency for name, ex in config.executors.items()},
        ),
    )
