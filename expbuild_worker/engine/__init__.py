"""The execution engine every front door shares: admission, staging, execution, collection, clean-up."""

from expbuild_worker.engine._admission import Admission
from expbuild_worker.engine._engine import EngineLimits, ExecutionEngine
from expbuild_worker.engine._work_root import DirectoryLock

__all__ = ["Admission", "DirectoryLock", "EngineLimits", "ExecutionEngine"]
