"""The engine's value types: actions in, events out. No protobuf here, by design."""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class IsolationLevel(enum.IntEnum):
    """An ordered scale: a higher value isolates at least as much as a lower one."""

    HOST = 1
    NAMESPACE_SANDBOX = 2
    CONTAINER = 3
    VIRTUALIZED = 4


class ExecutionStatus(enum.Enum):
    """How an action ended. Only COMPLETED means the command reached its own end."""

    COMPLETED = "completed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    OOM_KILLED = "oom_killed"
    FAILED_TO_START = "failed_to_start"
    INTERNAL = "internal"
    OUTPUT_LIMIT_EXCEEDED = "output_limit_exceeded"
    DISK_LIMIT_EXCEEDED = "disk_limit_exceeded"


class ExecutionStage(enum.Enum):
    """Where an admitted action is on its path; each stage is entered once, in this order."""

    QUEUED = "queued"
    STAGING_INPUTS = "staging_inputs"
    RUNNING = "running"
    COLLECTING_OUTPUTS = "collecting_outputs"
    COMPLETED = "completed"


class LogStream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"


class ResourceLimit(enum.Enum):
    """A kind of limit an executor may or may not enforce."""

    CPU = "cpu"
    MEMORY = "memory"
    PROCESSES = "processes"
    NETWORK = "network"
    TIMEOUT = "timeout"
    DISK = "disk"


@dataclass(frozen=True, slots=True)
class Digest:
    """A blob's identity: lower-case hex SHA-256 and size in bytes."""

    sha256: str
    size: int

    def __str__(self) -> str:
        return f"{self.sha256}/{self.size}"

    @classmethod
    def of_bytes(cls, data: bytes) -> Digest:
        return cls(hashlib.sha256(data).hexdigest(), len(data))

    @classmethod
    def of_file(cls, path: Path) -> Digest:
        """Hash a file by streaming it from disk; it never sits whole in memory."""
        with open(path, "rb") as fh:
            sha = hashlib.file_digest(fh, "sha256")
            size = fh.tell()
        return cls(sha.hexdigest(), size)


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """Limits for one action; ``None`` means "the executor's default" (or none)."""

    cpu_cores: float | None = None
    memory_bytes: int | None = None
    max_processes: int | None = None
    network: bool | None = None  # True = allowed, False = no network, None = executor default
    disk_bytes: int | None = None
    """Bytes the action's directory may hold on disk (inputs, outputs, temporaries)."""

    def with_defaults(self, defaults: ResourceLimits) -> ResourceLimits:
        """Fill every unset limit from ``defaults``."""
        return ResourceLimits(
            cpu_cores=self.cpu_cores if self.cpu_cores is not None else defaults.cpu_cores,
            memory_bytes=self.memory_bytes if self.memory_bytes is not None else defaults.memory_bytes,
            max_processes=self.max_processes if self.max_processes is not None else defaults.max_processes,
            network=self.network if self.network is not None else defaults.network,
            disk_bytes=self.disk_bytes if self.disk_bytes is not None else defaults.disk_bytes,
        )


@dataclass(frozen=True, slots=True)
class InputFile:
    """A file to materialise: exactly one of ``content`` and ``digest`` is set."""

    path: str
    content: bytes | None = None
    digest: Digest | None = None
    executable: bool = False


@dataclass(frozen=True, slots=True)
class InputSymlink:
    path: str
    target: str


@dataclass(frozen=True, slots=True)
class ExecutorSelector:
    """Pick an executor by name, or the weakest ready one at ``min_isolation`` or above."""

    name: str | None = None
    min_isolation: IsolationLevel | None = None


@dataclass(frozen=True, slots=True)
class Action:
    """One validated action. Every path is relative to the action root and normalised."""

    execution_id: str
    argv: tuple[str, ...]
    environment: Mapping[str, str]
    working_directory: str = ""
    input_files: tuple[InputFile, ...] = ()
    input_directories: tuple[str, ...] = ()
    input_symlinks: tuple[InputSymlink, ...] = ()
    output_files: tuple[str, ...] = ()
    output_directories: tuple[str, ...] = ()
    output_paths: tuple[str, ...] = ()
    """Outputs that may be a file or a directory, whichever the command makes."""
    stdin: bytes = b""
    timeout_seconds: float | None = None
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    executor: ExecutorSelector = field(default_factory=ExecutorSelector)
    image: str | None = None
    platform_properties: Mapping[str, str] = field(default_factory=dict)
    retain_outputs: bool = False
    """The caller reads outputs after the result (they are not streamed before it): keep them
    in the store, pinned, for the configured retention time after the result."""
    capture_logs: bool = False
    """Keep stdout and stderr as blobs as well (the result names their digests); live chunks
    are delivered either way."""
    recycle_runner: bool = False
    """The action may run in a recycled pool container (a container executor's choice: faster,
    isolated from earlier actions only by a clean-up). Executors read it as the platform
    property ``recycle-runner``, which front doors set alongside."""


# ---- events an action's stream carries -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    execution_id: str
    executor: str
    isolation: IsolationLevel
    queue_position: int


@dataclass(frozen=True, slots=True)
class StageEntered:
    """The action moved to ``stage`` (COMPLETED comes right before its result)."""

    stage: ExecutionStage


@dataclass(frozen=True, slots=True)
class Started:
    """The command is being launched; ``at`` is wall-clock seconds since the epoch."""

    at: float


@dataclass(frozen=True, slots=True)
class LogChunk:
    """Contiguous bytes of one stream; ``offset`` is the position of ``data[0]`` in it."""

    stream: LogStream
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class OutputChunk:
    path: str
    offset: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ResourceUsage:
    """CPU seconds and peak memory of the command; ``None`` where unknown."""

    user_cpu_seconds: float | None = None
    system_cpu_seconds: float | None = None
    peak_memory_bytes: int | None = None


@dataclass(frozen=True, slots=True)
class LogSummary:
    """Bytes a stream carried: all the command wrote, how many were streamed, whether a cap cut it."""

    size_bytes: int = 0
    streamed_bytes: int = 0
    truncated: bool = False


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """What an executor reports when the command is over (always its last event).

    ``status`` is COMPLETED when the command ended by itself (``exit_code`` or ``signal``
    set), TIMED_OUT or CANCELLED when the executor stopped it on request, OOM_KILLED when the
    kernel killed something for memory, FAILED_TO_START when it never ran, OUTPUT_LIMIT_EXCEEDED
    when the command ended but an executor that copies outputs back found them too large.
    Times are wall-clock seconds since the epoch.
    """

    status: ExecutionStatus
    exit_code: int | None = None
    signal: int | None = None
    message: str = ""
    usage: ResourceUsage = field(default_factory=ResourceUsage)
    started_at: float | None = None
    ended_at: float | None = None
    stdout: LogSummary | None = None  # set by the log-limiting decorator; None = count the chunks
    stderr: LogSummary | None = None


@dataclass(frozen=True, slots=True)
class OutputFile:
    path: str
    digest: Digest
    executable: bool


@dataclass(frozen=True, slots=True)
class OutputSymlink:
    path: str
    target: str


@dataclass(frozen=True, slots=True)
class OutputManifest:
    files: tuple[OutputFile, ...] = ()
    symlinks: tuple[OutputSymlink, ...] = ()
    directories: tuple[str, ...] = ()
    unreportable: tuple[str, ...] = ()
    """Outputs that exist but the API cannot carry (a name or symlink target that is not UTF-8),
    the first few as printable paths; they are not collected, and the result's message names them."""
    unreportable_count: int = 0
    """How many such outputs there were in all."""
    problems: tuple[str, ...] = ()
    """Outputs that exist but could not be collected (an OS error while reading them), each as
    "path: reason"; they are absent from the listing and the result's message names them."""


@dataclass(frozen=True, slots=True)
class StageTimes:
    """Wall-clock seconds since the epoch for each stage an action passed (None = never)."""

    queued: float | None = None
    worker_start: float | None = None
    left_queue: float | None = None  # cancelled while waiting: when it gave up its place
    inputs_staged: float | None = None
    command_start: float | None = None
    command_end: float | None = None
    outputs_started: float | None = None
    outputs_collected: float | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    execution_id: str
    status: ExecutionStatus
    message: str
    exit_code: int | None
    signal: int | None
    outputs: OutputManifest
    stdout: LogSummary
    stderr: LogSummary
    usage: ResourceUsage
    times: StageTimes
    executor: str
    isolation: IsolationLevel
    stdout_digest: Digest | None = None
    """stdout as a blob in the store, when the action asked for ``capture_logs``."""
    stderr_digest: Digest | None = None


ExecutorEvent = Started | LogChunk | RunOutcome
"""What an executor yields: Started, then LogChunks, then exactly one RunOutcome."""

ActionEvent = Accepted | StageEntered | Started | LogChunk | ActionResult
"""What the engine yields to a front door: Accepted first, ActionResult last."""


# ---- capabilities ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Readiness:
    ready: bool
    message: str = ""


@dataclass(frozen=True, slots=True)
class ExecutorCapabilities:
    name: str
    isolation: IsolationLevel
    readiness: Readiness
    enforced_limits: frozenset[ResourceLimit]
    unenforced_limits: frozenset[ResourceLimit]
    max_limits: ResourceLimits = field(default_factory=ResourceLimits)
    default_limits: ResourceLimits = field(default_factory=ResourceLimits)
    details: Mapping[str, str] = field(default_factory=dict)
    images_present: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmupReport:
    name: str
    ready: bool
    message: str = ""
    images_present: tuple[str, ...] = ()
