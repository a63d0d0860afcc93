"""The sandbox executor: each command in its own Linux namespaces, made by bubblewrap."""

from __future__ import annotations

from expbuild_worker.execution.sandbox._executor import SandboxExecutor

__all__ = ["SandboxExecutor"]
