"""The host executor: each command a plain process in its own process group."""

from __future__ import annotations

from expbuild_worker.execution.host._executor import HostExecutor

__all__ = ["HostExecutor"]
