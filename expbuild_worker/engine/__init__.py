"""The execution engine every front door shares: admission, staging, execution, collection, clean-up."""

from expbuild_worker.engine._admission import Admission
from expbuild_worker.engine._engine import EngineLimits, ExecutionEngine

__all__ = ["Admission", "EngineLimits", "ExecutionEngine"]
