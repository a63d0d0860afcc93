"""The execution engine every front door shares: admission, the executions table, the action runner."""

from expbuild_worker.engine._action_log import CALLER, ActionLogRunner
from expbuild_worker.engine._admission import Admission
from expbuild_worker.engine._engine import EngineLimits, ExecutionEngine
from expbuild_worker.engine._executions import Execution, ExecutionTable
from expbuild_worker.engine._log_capture import LogCapturingRunner
from expbuild_worker.engine._log_context import ExecutionIdRunner
from expbuild_worker.engine._metrics import ActionMetrics, EngineCollector, MetricsRunner
from expbuild_worker.engine._runner import ActionRunner, LocalActionRunner, RunnerDecorator, RunnerLimits
from expbuild_worker.engine._status import ExecutorStatus, StatusSignal, WorkerStatus
from expbuild_worker.engine._timestamps import TimestampingRunner
from expbuild_worker.engine._work_root import DirectoryLock
from expbuild_worker.engine._workdirs import ActionDirectories

__all__ = [
    "CALLER",
    "ActionDirectories",
    "ActionLogRunner",
    "ActionMetrics",
    "ActionRunner",
    "Admission",
    "DirectoryLock",
    "EngineCollector",
    "EngineLimits",
    "Execution",
    "ExecutionEngine",
    "ExecutionIdRunner",
    "ExecutionTable",
    "ExecutorStatus",
    "LocalActionRunner",
    "LogCapturingRunner",
    "MetricsRunner",
    "RunnerDecorator",
    "RunnerLimits",
    "StatusSignal",
    "TimestampingRunner",
    "WorkerStatus",
]
