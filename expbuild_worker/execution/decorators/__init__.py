"""Cross-cutting concerns, each an Executor that wraps another Executor."""

from expbuild_worker.execution.decorators._base import ExecutorDecorator
from expbuild_worker.execution.decorators._deadline import DeadlineExecutor
from expbuild_worker.execution.decorators._disk_limit import DiskLimitingExecutor
from expbuild_worker.execution.decorators._log_limit import LogLimitingExecutor

__all__ = [
    "DeadlineExecutor",
    "DiskLimitingExecutor",
    "ExecutorDecorator",
    "LogLimitingExecutor",
]
