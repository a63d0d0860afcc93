"""The Docker executor: each action in its own hardened container on a Docker daemon."""

from __future__ import annotations

from typing import Any

import docker
from docker.utils import kwargs_from_env

from expbuild_worker.config import DockerExecutorConfig
from expbuild_worker.errors import ConfigError
from expbuild_worker.execution.docker._daemon import DEFAULT_ADDRESS, DockerDaemon
from expbuild_worker.execution.docker._executor import DockerExecutor

__all__ = ["DockerExecutor", "build_docker_executor"]

_POOL_THREADS = 16
"""Daemon calls in flight at once. Each is short (create, start, wait after exit, remove);
log streams have their own threads."""


def build_docker_executor(
    *, name: str, config: DockerExecutorConfig, worker_id: str, capacity: int = 0
) -> DockerExecutor:
    """Build the executor named ``name`` from its parsed config; call ``await start()`` next.

    The daemon is ``config.docker_host`` when set, else ``DOCKER_HOST`` (with ``DOCKER_TLS_VERIFY``
    and ``DOCKER_CERT_PATH``, as the Docker CLI reads them), else the local socket. Nothing
    contacts the daemon here. ``capacity`` is how many actions the worker runs at once: the
    container pool keeps no more containers, idle and busy, than that (or ``max_concurrency``).
    A configured seccomp profile is read now, so a bad path fails at start-up rather than on
    the first action.
    """
    kwargs: dict[str, Any] = kwargs_from_env()
    if config.docker_host:
        kwargs["base_url"] = config.docker_host
    address = str(kwargs.get("base_url") or DEFAULT_ADDRESS)
    kwargs["base_url"] = address
    threads = max(_POOL_THREADS, 2 * config.max_concurrency)
    seccomp = ""
    if config.seccomp_profile:
        try:
            with open(config.seccomp_profile, encoding="utf-8") as fh:
                seccomp = fh.read()
        except OSError as err:
            raise ConfigError(
                f"executor.{name}.seccomp_profile: cannot read {config.seccomp_profile!r}: {err.strerror}"
            ) from err

    def connect() -> Any:
        return docker.APIClient(version="auto", max_pool_size=threads, **kwargs)

    daemon = DockerDaemon(connect=connect, address=address, max_threads=threads)
    return DockerExecutor(
        name=name,
        config=config,
        worker_id=worker_id,
        daemon=daemon,
        seccomp_profile=seccomp,
        capacity=capacity,
    )
