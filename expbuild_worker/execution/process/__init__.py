"""The process runner the host and sandbox executors share: spawn, stream, wait, kill, cgroups, user."""

from __future__ import annotations

from expbuild_worker.execution.process._runner import (
    SPARE_CGROUPS,
    SPARE_CGROUPS_LOW,
    Launch,
    Launcher,
    ProcessRunner,
    new_token,
    owner_alive,
)
from expbuild_worker.execution.process._spawn import (
    GRPC_FORK_SUPPORT,
    CommandPipes,
    SpawnFailure,
    disable_grpc_fork_handlers,
    grpc_fork_handlers_disabled,
    resolve_executable,
)

__all__ = [
    "GRPC_FORK_SUPPORT",
    "SPARE_CGROUPS",
    "SPARE_CGROUPS_LOW",
    "CommandPipes",
    "Launch",
    "Launcher",
    "ProcessRunner",
    "SpawnFailure",
    "disable_grpc_fork_handlers",
    "grpc_fork_handlers_disabled",
    "new_token",
    "owner_alive",
    "resolve_executable",
]
