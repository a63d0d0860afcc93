"""The host executor: each command a plain process in its own process group."""

from __future__ import annotations

from expbuild_worker.execution.host._executor import HostExecutor
from expbuild_worker.execution.process import (
    GRPC_FORK_SUPPORT,
    disable_grpc_fork_handlers,
    grpc_fork_handlers_disabled,
)

__all__ = ["GRPC_FORK_SUPPORT", "HostExecutor", "disable_grpc_fork_handlers", "grpc_fork_handlers_disabled"]
