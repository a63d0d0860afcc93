"""Translate between expbuild.worker.v1 messages and the engine's value types."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1.digests import digest_from_pb, fill_digest
from expbuild_worker.engine import WorkerStatus
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import (
    Accepted,
    Action,
    ActionEvent,
    ActionResult,
    ExecutionStatus,
    ExecutorCapabilities,
    ExecutorSelector,
    InputFile,
    InputSymlink,
    IsolationLevel,
    LogChunk,
    LogStream,
    LogSummary,
    OutputChunk,
    ResourceLimit,
    ResourceLimits,
    StageEntered,
    Started,
    WarmupReport,
)

_ISOLATION_TO_PB = {
    IsolationLevel.HOST: pb.ISOLATION_LEVEL_HOST,
    IsolationLevel.NAMESPACE_SANDBOX: pb.ISOLATION_LEVEL_NAMESPACE_SANDBOX,
    IsolationLevel.CONTAINER: pb.ISOLATION_LEVEL_CONTAINER,
    IsolationLevel.VIRTUALIZED: pb.ISOLATION_LEVEL_VIRTUALIZED,
}
_ISOLATION_FROM_PB = {v: k for k, v in _ISOLATION_TO_PB.items()}
_STATUS_TO_PB = {
    ExecutionStatus.COMPLETED: pb.EXECUTION_STATUS_COMPLETED,
    ExecutionStatus.TIMED_OUT: pb.EXECUTION_STATUS_TIMED_OUT,
    ExecutionStatus.CANCELLED: pb.EXECUTION_STATUS_CANCELLED,
    ExecutionStatus.OOM_KILLED: pb.EXECUTION_STATUS_OOM_KILLED,
    ExecutionStatus.FAILED_TO_START: pb.EXECUTION_STATUS_FAILED_TO_START,
    ExecutionStatus.INTERNAL: pb.EXECUTION_STATUS_INTERNAL,
    ExecutionStatus.OUTPUT_LIMIT_EXCEEDED: pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED,
    ExecutionStatus.DISK_LIMIT_EXCEEDED: pb.EXECUTION_STATUS_DISK_LIMIT_EXCEEDED,
}
_STREAM_TO_PB = {LogStream.STDOUT: pb.LOG_STREAM_STDOUT, LogStream.STDERR: pb.LOG_STREAM_STDERR}
_LIMIT_TO_PB = {
    ResourceLimit.CPU: pb.RESOURCE_LIMIT_CPU,
    ResourceLimit.MEMORY: pb.RESOURCE_LIMIT_MEMORY,
    ResourceLimit.PROCESSES: pb.RESOURCE_LIMIT_PROCESSES,
    ResourceLimit.NETWORK: pb.RESOURCE_LIMIT_NETWORK,
    ResourceLimit.TIMEOUT: pb.RESOURCE_LIMIT_TIMEOUT,
    ResourceLimit.DISK: pb.RESOURCE_LIMIT_DISK,
}
_NETWORK_FROM_PB: Mapping[int, bool | None] = {
    pb.NETWORK_ACCESS_UNSPECIFIED: None,
    pb.NETWORK_ACCESS_DISABLED: False,
    pb.NETWORK_ACCESS_ENABLED: True,
}


def _seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


_NANOS = 1_000_000_000


def _set_timestamp(ts: Timestamp, at: float | None) -> None:
    """Fill ``ts`` in place (a field of the message being built: no copy, unlike a constructor)."""
    if at is not None:
        ts.seconds, ts.nanos = divmod(round(at * 1e9), _NANOS)


def _set_duration(d: Duration, seconds: float | None) -> None:
    """Fill ``d`` in place with a non-negative duration; None leaves the field unset."""
    if seconds is not None:
        d.seconds, d.nanos = divmod(round(max(0.0, seconds) * 1e9), _NANOS)


def action_from_pb(req: pb.ExecuteRequest) -> Action:
    """Field-level checks that need the wire form (enums, oneofs); path rules live in validation."""
    files = []
    for i, f in enumerate(req.input_files):
        which = f.WhichOneof("source")
        if which is None:
            raise InvalidRequestError(f"input_files[{i}]: set content or digest")
        files.append(
            InputFile(
                path=f.path,
                content=f.content if which == "content" else None,
                digest=digest_from_pb(f.digest) if which == "digest" else None,
                executable=f.is_executable,
            )
        )
    limits = req.limits
    if limits.network not in _NETWORK_FROM_PB:
        raise InvalidRequestError(f"limits.network: unknown value {limits.network}")
    for name in ("cpu_cores", "memory_bytes", "max_processes", "disk_bytes"):
        if getattr(limits, name) < 0:
            raise InvalidRequestError(f"limits.{name}: expected zero (default) or a positive number")
    min_iso = req.executor.min_isolation
    if min_iso != pb.ISOLATION_LEVEL_UNSPECIFIED and min_iso not in _ISOLATION_FROM_PB:
        raise InvalidRequestError(f"executor.min_isolation: unknown value {min_iso}")
    timeout: float | None = None
    if req.HasField("timeout"):
        if req.timeout.seconds < 0 or req.timeout.nanos < 0:
            raise InvalidRequestError("timeout: must not be negative")
        timeout = _seconds(req.timeout) or None
    return Action(
        execution_id=req.execution_id,
        argv=tuple(req.argv),
        environment=dict(req.environment),
        working_directory=req.working_directory,
        input_files=tuple(files),
        input_directories=tuple(d.path for d in req.input_directories),
        input_symlinks=tuple(InputSymlink(s.path, s.target) for s in req.input_symlinks),
        output_files=tuple(req.output_files),
        output_directories=tuple(req.output_directories),
        stdin=req.stdin,
        timeout_seconds=timeout,
        limits=ResourceLimits(
            cpu_cores=limits.cpu_cores or None,
            memory_bytes=limits.memory_bytes or None,
            max_processes=limits.max_processes or None,
            network=_NETWORK_FROM_PB[limits.network],
            disk_bytes=limits.disk_bytes or None,
        ),
        executor=ExecutorSelector(
            name=req.executor.name or None,
            min_isolation=_ISOLATION_FROM_PB.get(min_iso),
        ),
        image=req.container_image or None,
        platform_properties=dict(req.platform_properties),
        retain_outputs=req.omit_output_contents,
        recycle_runner=req.recycle_runner
        or req.platform_properties.get("recycle-runner", "").lower() == "true",
    )


def event_to_pb(event: ActionEvent | OutputChunk) -> pb.ExecuteResponse:
    """One event of the own API's Execute stream (stage events have no form of their own here)."""
    # Chunks are filled in place: building the inner message first and passing it to the
    # outer constructor copies the payload twice (20x slower for 1 MiB chunks).
    resp = pb.ExecuteResponse()
    if isinstance(event, LogChunk):
        log = resp.log
        log.stream = _STREAM_TO_PB[event.stream]
        log.offset = event.offset
        log.data = event.data
        return resp
    if isinstance(event, OutputChunk):
        chunk = resp.output_chunk
        chunk.path = event.path
        chunk.offset = event.offset
        chunk.data = event.data
        return resp
    if isinstance(event, Started):
        _set_timestamp(resp.started.start_time, event.at)
        return resp
    if isinstance(event, Accepted):
        accepted = resp.accepted
        accepted.execution_id = event.execution_id
        accepted.executor = event.executor
        accepted.isolation_level = _ISOLATION_TO_PB[event.isolation]
        accepted.queue_position = event.queue_position
        return resp
    if isinstance(event, StageEntered):
        raise TypeError("stage events are not sent on the own API")
    _fill_result(resp.result, event)
    return resp


def _fill_log_summary(out: pb.LogSummary, s: LogSummary) -> None:
    out.size_bytes = s.size_bytes
    out.streamed_bytes = s.streamed_bytes
    out.truncated = s.truncated


def _fill_result(out: pb.ExecutionResult, r: ActionResult) -> None:
    """Fill ``out`` in place: nested messages built first and passed to constructors are copied."""
    out.execution_id = r.execution_id
    out.status = _STATUS_TO_PB[r.status]
    out.message = r.message
    out.exit_code = r.exit_code or 0
    out.signal = r.signal or 0
    for f in r.outputs.files:
        fill_digest(out.output_files.add(path=f.path, is_executable=f.executable).digest, f.digest)
    for link in r.outputs.symlinks:
        out.output_symlinks.add(path=link.path, target=link.target)
    for directory in r.outputs.directories:
        out.output_directories.add(path=directory)
    _fill_log_summary(out.stdout, r.stdout)
    _fill_log_summary(out.stderr, r.stderr)
    out.executor = r.executor
    out.isolation_level = _ISOLATION_TO_PB[r.isolation]
    stats, t, usage = out.stats, r.times, r.usage
    left_queue = t.worker_start if t.worker_start is not None else t.left_queue
    if left_queue is not None and t.queued is not None:
        _set_duration(stats.queue_time, left_queue - t.queued)
    if t.command_start is not None and t.command_end is not None:
        _set_duration(stats.wall_time, t.command_end - t.command_start)
    _set_duration(stats.user_cpu_time, usage.user_cpu_seconds)
    _set_duration(stats.system_cpu_time, usage.system_cpu_seconds)
    stats.peak_memory_bytes = usage.peak_memory_bytes or 0
    _set_timestamp(stats.queued_time, t.queued)
    _set_timestamp(stats.worker_start_time, t.worker_start)
    _set_timestamp(stats.inputs_staged_time, t.inputs_staged)
    _set_timestamp(stats.command_start_time, t.command_start)
    _set_timestamp(stats.command_end_time, t.command_end)
    _set_timestamp(stats.outputs_collected_time, t.outputs_collected)


def _limits_to_pb(limits: ResourceLimits) -> pb.ResourceLimits:
    network = pb.NETWORK_ACCESS_UNSPECIFIED
    if limits.network is not None:
        network = pb.NETWORK_ACCESS_ENABLED if limits.network else pb.NETWORK_ACCESS_DISABLED
    return pb.ResourceLimits(
        cpu_cores=limits.cpu_cores or 0.0,
        memory_bytes=limits.memory_bytes or 0,
        max_processes=limits.max_processes or 0,
        network=network,
        disk_bytes=limits.disk_bytes or 0,
    )


def capabilities_to_pb(c: ExecutorCapabilities) -> pb.ExecutorCapabilities:
    return pb.ExecutorCapabilities(
        name=c.name,
        isolation_level=_ISOLATION_TO_PB[c.isolation],
        ready=c.readiness.ready,
        readiness_message=c.readiness.message,
        enforced_limits=sorted(_LIMIT_TO_PB[x] for x in c.enforced_limits),
        unenforced_limits=sorted(_LIMIT_TO_PB[x] for x in c.unenforced_limits),
        max_limits=_limits_to_pb(c.max_limits),
        default_limits=_limits_to_pb(c.default_limits),
        details=dict(c.details),
        images_present=list(c.images_present),
    )


def warmup_to_pb(w: WarmupReport) -> pb.ExecutorWarmup:
    return pb.ExecutorWarmup(
        name=w.name, ready=w.ready, message=w.message, images_present=list(w.images_present)
    )


def duration_to_pb(seconds: float) -> Duration:
    d = Duration()
    _set_duration(d, seconds)
    return d


def worker_status_to_pb(s: WorkerStatus, *, worker_id: str, at: float) -> pb.WorkerStatus:
    out = pb.WorkerStatus(
        worker_id=worker_id,
        running_executions=s.running,
        queued_executions=s.queued,
        free_slots=s.free_slots,
        free_queue_places=s.free_queue_places,
        max_concurrent_executions=s.max_running,
        max_queued_executions=s.max_queued,
        accepting=s.accepting,
        executors=[
            pb.ExecutorStatus(
                name=e.name,
                ready=e.readiness.ready,
                readiness_message=e.readiness.message,
                running_executions=e.running,
                max_concurrency=e.max_concurrency,
                free_slots=e.free_slots,
            )
            for e in s.executors
        ],
        version=s.version,
    )
    _set_timestamp(out.time, at)
    return out


MIN_STATUS_INTERVAL_SECONDS = 0.05
DEFAULT_STATUS_INTERVAL_SECONDS = 0.2
MIN_HEARTBEAT_SECONDS = 1.0
DEFAULT_HEARTBEAT_SECONDS = 10.0


def watch_intervals_from_pb(req: pb.WatchWorkerStatusRequest) -> tuple[float, float]:
    """(min_interval, heartbeat_interval) in seconds, defaults and floors applied."""
    chosen = []
    for name, default, floor in (
        ("min_interval", DEFAULT_STATUS_INTERVAL_SECONDS, MIN_STATUS_INTERVAL_SECONDS),
        ("heartbeat_interval", DEFAULT_HEARTBEAT_SECONDS, MIN_HEARTBEAT_SECONDS),
    ):
        seconds = _seconds(getattr(req, name))
        if seconds < 0:
            raise InvalidRequestError(f"{name}: expected a non-negative duration, got {seconds:g}s")
        chosen.append(max(floor, seconds) if seconds else default)
    return chosen[0], chosen[1]
