"""Translate between expbuild.worker.v1 messages and the engine's value types."""

from __future__ import annotations

from collections.abc import Mapping

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import (
    Accepted,
    Action,
    ActionEvent,
    ActionResult,
    Digest,
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
}
_STREAM_TO_PB = {LogStream.STDOUT: pb.LOG_STREAM_STDOUT, LogStream.STDERR: pb.LOG_STREAM_STDERR}
_LIMIT_TO_PB = {
    ResourceLimit.CPU: pb.RESOURCE_LIMIT_CPU,
    ResourceLimit.MEMORY: pb.RESOURCE_LIMIT_MEMORY,
    ResourceLimit.PROCESSES: pb.RESOURCE_LIMIT_PROCESSES,
    ResourceLimit.NETWORK: pb.RESOURCE_LIMIT_NETWORK,
    ResourceLimit.TIMEOUT: pb.RESOURCE_LIMIT_TIMEOUT,
}
_NETWORK_FROM_PB: Mapping[int, bool | None] = {
    pb.NETWORK_ACCESS_UNSPECIFIED: None,
    pb.NETWORK_ACCESS_DISABLED: False,
    pb.NETWORK_ACCESS_ENABLED: True,
}


def digest_from_pb(d: pb.Digest) -> Digest:
    return Digest(d.sha256, d.size_bytes)


def digest_to_pb(d: Digest) -> pb.Digest:
    return pb.Digest(sha256=d.sha256, size_bytes=d.size)


def _seconds(d: Duration) -> float:
    return d.seconds + d.nanos / 1e9


def _duration(seconds: float | None) -> Duration | None:
    if seconds is None:
        return None
    d = Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _timestamp(at: float | None) -> Timestamp | None:
    if at is None:
        return None
    ts = Timestamp()
    ts.FromNanoseconds(round(at * 1e9))
    return ts


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
    for name in ("cpu_cores", "memory_bytes", "max_processes"):
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
        ),
        executor=ExecutorSelector(
            name=req.executor.name or None,
            min_isolation=_ISOLATION_FROM_PB.get(min_iso),
        ),
        image=req.container_image or None,
        platform_properties=dict(req.platform_properties),
        stream_output_contents=not req.omit_output_contents,
    )


def event_to_pb(event: ActionEvent) -> pb.ExecuteResponse:
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
        return pb.ExecuteResponse(started=pb.ExecutionStarted(start_time=_timestamp(event.at)))
    if isinstance(event, Accepted):
        return pb.ExecuteResponse(
            accepted=pb.ExecutionAccepted(
                execution_id=event.execution_id,
                executor=event.executor,
                isolation_level=_ISOLATION_TO_PB[event.isolation],
                queue_position=event.queue_position,
            )
        )
    return pb.ExecuteResponse(result=result_to_pb(event))


def _log_summary(s: LogSummary) -> pb.LogSummary:
    return pb.LogSummary(size_bytes=s.size_bytes, streamed_bytes=s.streamed_bytes, truncated=s.truncated)


def result_to_pb(r: ActionResult) -> pb.ExecutionResult:
    t = r.times
    queue_time = None
    if t.worker_start is not None and t.queued is not None:
        queue_time = _duration(max(0.0, t.worker_start - t.queued))
    wall = None
    if t.command_start is not None and t.command_end is not None:
        wall = _duration(max(0.0, t.command_end - t.command_start))
    stats = pb.ExecutionStats(
        wall_time=wall,
        user_cpu_time=_duration(r.usage.user_cpu_seconds),
        system_cpu_time=_duration(r.usage.system_cpu_seconds),
        peak_memory_bytes=r.usage.peak_memory_bytes or 0,
        queue_time=queue_time,
        queued_time=_timestamp(t.queued),
        worker_start_time=_timestamp(t.worker_start),
        inputs_staged_time=_timestamp(t.inputs_staged),
        command_start_time=_timestamp(t.command_start),
        command_end_time=_timestamp(t.command_end),
        outputs_collected_time=_timestamp(t.outputs_collected),
    )
    return pb.ExecutionResult(
        execution_id=r.execution_id,
        status=_STATUS_TO_PB[r.status],
        message=r.message,
        exit_code=r.exit_code or 0,
        signal=r.signal or 0,
        output_files=[
            pb.OutputFile(path=f.path, digest=digest_to_pb(f.digest), is_executable=f.executable)
            for f in r.outputs.files
        ],
        output_symlinks=[pb.OutputSymlink(path=s.path, target=s.target) for s in r.outputs.symlinks],
        output_directories=[pb.OutputDirectory(path=d) for d in r.outputs.directories],
        stdout=_log_summary(r.stdout),
        stderr=_log_summary(r.stderr),
        stats=stats,
        executor=r.executor,
        isolation_level=_ISOLATION_TO_PB[r.isolation],
    )


def _limits_to_pb(limits: ResourceLimits) -> pb.ResourceLimits:
    network = pb.NETWORK_ACCESS_UNSPECIFIED
    if limits.network is not None:
        network = pb.NETWORK_ACCESS_ENABLED if limits.network else pb.NETWORK_ACCESS_DISABLED
    return pb.ResourceLimits(
        cpu_cores=limits.cpu_cores or 0.0,
        memory_bytes=limits.memory_bytes or 0,
        max_processes=limits.max_processes or 0,
        network=network,
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
    d = _duration(seconds)
    assert d is not None
    return d
