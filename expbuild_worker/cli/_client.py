"""The client subcommands: ``exec`` runs a command on a worker; ``capabilities`` and ``health`` query one."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import grpc
from google.protobuf import json_format

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.client import (
    ChannelSecurity,
    OutputWriter,
    WorkerClient,
    collect_inputs,
    parse_input_spec,
)
from expbuild_worker.errors import ConfigError, WorkerError

EXIT_USAGE = 2
EXIT_OUTPUT_LIMIT = 123
EXIT_TIMED_OUT = 124
EXIT_INFRASTRUCTURE = 125
EXIT_FAILED_TO_START = 127
EXIT_CANCELLED = 130
EXIT_OOM_KILLED = 122  # not 137: that is also "killed by SIGKILL"
EXIT_NOT_SERVING = 1

_EXEC_EPILOG = f"""\
exit status:
  N         the remote command exited with N (0-255)
  128+N     the remote command was killed by signal N
  {EXIT_OOM_KILLED}       OOM_KILLED: the kernel's OOM killer killed the command
  {EXIT_OUTPUT_LIMIT}       OUTPUT_LIMIT_EXCEEDED: the outputs exceeded the worker's cap; none were collected
  {EXIT_TIMED_OUT}       TIMED_OUT: the command ran past --timeout and was killed
  {EXIT_INFRASTRUCTURE}       infrastructure failure: worker unreachable, request refused, INTERNAL, broken
            stream, or an output that could not be written or verified
  {EXIT_FAILED_TO_START}       FAILED_TO_START: the command could not be started (argv[0] missing or not
            executable, image missing)
  {EXIT_CANCELLED}       CANCELLED: interrupted with Ctrl-C (the remote action is cancelled) or cancelled
            on the worker
  {EXIT_USAGE}         bad arguments (for example an --input that cannot be read)
Every code other than the command's own is explained in one line on stderr.
"""

DEFAULT_TARGET = "127.0.0.1:50051"
ENV_TARGET = "EXPBUILD_WORKER_TARGET"
_SECURITY_OPTIONS = (
    # (option, environment variable, ChannelSecurity field, metavar, help)
    ("--tls-ca", "EXPBUILD_WORKER_TLS_CA", "ca_file", "FILE",
     "CA certificate (PEM) that signed the worker's certificate; turns TLS on"),
    ("--tls-cert", "EXPBUILD_WORKER_TLS_CERT", "certificate_file", "FILE",
     "client certificate (PEM) for mutual TLS; needs --tls-key"),
    ("--tls-key", "EXPBUILD_WORKER_TLS_KEY", "private_key_file", "FILE",
     "private key (PEM) of the client certificate"),
    ("--token-file", "EXPBUILD_WORKER_TOKEN_FILE", "token_file", "FILE",
     "file holding a bearer token sent with every call"),
    ("--server-name", "EXPBUILD_WORKER_SERVER_NAME", "server_name", "NAME",
     "name the worker's certificate must carry (default: the host of --target)"),
)  # fmt: skip

_ENVIRONMENT_EPILOG = (
    "environment:\n"
    + f"  {ENV_TARGET:<29} default for --target (else {DEFAULT_TARGET})\n"
    + "".join(f"  {env:<29} default for {option}\n" for option, env, *_ in _SECURITY_OPTIONS)
    + "Options given on the command line win over the environment."
)

_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_CONNECT_TIMEOUT_SECONDS = 5.0
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
"""PATH sent when --env sets none, so ``exec -- make`` finds make; nothing else is defaulted."""


def parse_memory(text: str) -> int:
    """Bytes from "1048576", "512M", "2G", "1.5GiB" (binary units, like Docker's --memory)."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(f"expected bytes or a size like 512M or 2G, got {text!r}")
    value = int(float(match["number"]) * _UNITS[match["unit"].lower()])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _env_pair(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return name, value


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``exec``, ``capabilities`` and ``health``."""
    ex = subparsers.add_parser(
        "exec",
        help="run a command on a worker, streaming its output and downloading its outputs",
        usage="%(prog)s [--target HOST:PORT] [options] -- ARGV...",
        description=textwrap.fill(
            "Run ARGV on a worker. Nothing of the local environment is sent: the command gets the "
            f"--env variables only, plus PATH={DEFAULT_PATH} unless --env sets PATH. Remote "
            "stdout/stderr stream live to local stdout/stderr, byte for byte.",
            width=90,
        ),
        epilog=_EXEC_EPILOG + "\n" + _ENVIRONMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection(ex)
    ex.add_argument("--executor", metavar="NAME", default="", help="executor to use (default: the worker's)")
    ex.add_argument("--image", metavar="IMAGE", default="", help="container image (container executors only)")
    ex.add_argument("--timeout", metavar="SECONDS", type=_positive_float, help="wall-clock limit")
    ex.add_argument("--cpus", metavar="N", type=_positive_float, help="CPU cores (for example 1.5)")
    ex.add_argument("--memory", metavar="BYTES", type=parse_memory, help="memory limit: bytes, or 512M, 2G")
    ex.add_argument(
        "--env", metavar="K=V", type=_env_pair, action="append", default=[], help="environment variable"
    )
    ex.add_argument(
        "--input",
        metavar="LOCAL[:REMOTE]",
        action="append",
        default=[],
        help="file or directory (recursively) to upload; REMOTE defaults to LOCAL's relative path "
        "or, for absolute paths, its base name",
    )
    ex.add_argument(
        "--output",
        metavar="PATH",
        action="append",
        default=[],
        help="file or directory (relative to the action root) to download after the command",
    )
    ex.add_argument("--output-dir", metavar="DIR", default=".", help="where outputs are written (default: .)")
    ex.add_argument("--workdir", metavar="DIR", default="", help="working directory relative to the root")
    ex.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- ARGV", help="the command, after --")
    ex.set_defaults(handler=run_exec)

    caps = subparsers.add_parser(
        "capabilities",
        help="show a worker's executors, platform and limits",
        description="Show a worker's executors, platform and limits.",
        epilog=_ENVIRONMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection(caps)
    caps.add_argument("--json", action="store_true", help="print the GetCapabilities response as JSON")
    caps.set_defaults(handler=run_capabilities)

    health = subparsers.add_parser(
        "health",
        help="print a worker's health status; exit 0 only when SERVING",
        description=textwrap.fill(
            "Print a worker's health status (SERVING, NOT_SERVING, SERVICE_UNKNOWN); exit 0 only when "
            "SERVING. The health service answers without credentials, so a probe needs no token.",
            width=90,
        ),
        epilog=_ENVIRONMENT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection(health)
    health.add_argument("--service", metavar="NAME", default="", help="service name (default: the worker)")
    health.set_defaults(handler=run_health)


def _add_connection(parser: argparse.ArgumentParser) -> None:
    """--target and the options that say how to prove who we are, defaulted from the environment."""
    group = parser.add_argument_group("connection")
    group.add_argument(
        "--target",
        metavar="HOST:PORT",
        default=os.environ.get(ENV_TARGET) or DEFAULT_TARGET,
        help=f"the worker's address (default: ${ENV_TARGET}, else {DEFAULT_TARGET})",
    )
    for option, env, field, metavar, text in _SECURITY_OPTIONS:
        group.add_argument(option, dest=field, metavar=metavar, default=os.environ.get(env, ""), help=text)


def _security(args: argparse.Namespace) -> ChannelSecurity:
    return ChannelSecurity(**{field: getattr(args, field) for _, _, field, _, _ in _SECURITY_OPTIONS})


def _open(command: str, args: argparse.Namespace, **kwargs: Any) -> WorkerClient | None:
    """A client for ``args.target`` with the given security; None (said on stderr) when a
    credential file cannot be read or the options do not fit together."""
    try:
        return WorkerClient(args.target, security=_security(args), **kwargs)
    except ConfigError as err:
        _say(command, str(err))
        return None


class _Reachability:
    """Watches a channel's connectivity, so a failed call can be told apart: no connection was
    ever made ("cannot reach"), a connection was lost, or the worker answered with a status.

    gRPC reports all three as UNAVAILABLE with text only, so the channel's own states decide.
    ``wait`` settles the first connection attempt before any call, which keeps a worker's
    immediate answer from racing the READY notification (delivered on gRPC's own thread)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self._channel = channel
        self._state: grpc.ChannelConnectivity | None = None
        self._connected = threading.Event()
        self._settled = threading.Event()
        channel.subscribe(self._on_state, try_to_connect=True)

    def _on_state(self, state: grpc.ChannelConnectivity) -> None:
        self._state = state
        if state is grpc.ChannelConnectivity.READY:
            self._connected.set()
        if state in (
            grpc.ChannelConnectivity.READY,
            grpc.ChannelConnectivity.TRANSIENT_FAILURE,
            grpc.ChannelConnectivity.SHUTDOWN,
        ):
            self._settled.set()

    def wait(self, timeout: float) -> None:
        """Until the first attempt connected or failed, at most ``timeout`` seconds."""
        self._settled.wait(timeout)

    def close(self) -> None:
        self._channel.unsubscribe(self._on_state)

    def describe(self, target: str, err: grpc.RpcError) -> str:
        """The one line that says what went wrong, by who said it."""
        code = err.code()
        name = code.name if code is not None else "UNKNOWN"
        details = (err.details() or "").replace("\n", " ")
        if code == grpc.StatusCode.UNAVAILABLE and not self._connected.is_set():
            return f"cannot reach worker at {target}: {details}"
        if code == grpc.StatusCode.UNAVAILABLE and self._state is not grpc.ChannelConnectivity.READY:
            return f"lost the connection to worker at {target}: {details}"
        return f"worker at {target} answered {name}: {details}"


def _say(command: str, message: str) -> None:
    sys.stderr.write(f"expbuild-worker {command}: {message}\n")
    sys.stderr.flush()


def _rpc_failure(command: str, target: str, err: grpc.RpcError, reach: _Reachability) -> int:
    _say(command, reach.describe(target, err))
    return EXIT_INFRASTRUCTURE


def build_request(args: argparse.Namespace, argv: Sequence[str]) -> pb.ExecuteRequest:
    """The ExecuteRequest the ``exec`` flags describe (inputs are added separately)."""
    request = pb.ExecuteRequest(argv=argv, working_directory=args.workdir, container_image=args.image)
    request.environment.update({"PATH": DEFAULT_PATH, **dict(args.env)})
    if args.executor:
        request.executor.name = args.executor
    if args.timeout is not None:
        request.timeout.FromNanoseconds(round(args.timeout * 1e9))
    if args.cpus is not None:
        request.limits.cpu_cores = args.cpus
    if args.memory is not None:
        request.limits.memory_bytes = args.memory
    for path in args.output:
        stripped = path.rstrip("/")
        request.output_directories.append(stripped)
        if stripped == path:
            # A path without a trailing "/" may name a file or a directory: ask for both; the
            # worker collects whichever exists.
            request.output_files.append(stripped)
    return request


def exit_status(result: pb.ExecutionResult) -> tuple[int, str | None]:
    """The exit code ``exec`` returns for ``result``, with the stderr line explaining it (if any)."""
    status = result.status
    detail = f": {result.message}" if result.message else ""
    if status == pb.EXECUTION_STATUS_COMPLETED:
        if result.signal:
            return 128 + result.signal, f"COMPLETED: command killed by signal {_signal_name(result.signal)}"
        return result.exit_code, None
    if status == pb.EXECUTION_STATUS_TIMED_OUT:
        return EXIT_TIMED_OUT, f"TIMED_OUT: command killed at its timeout{detail}"
    if status == pb.EXECUTION_STATUS_CANCELLED:
        return EXIT_CANCELLED, f"CANCELLED: the action was cancelled on the worker{detail}"
    if status == pb.EXECUTION_STATUS_OOM_KILLED:
        return EXIT_OOM_KILLED, f"OOM_KILLED: the command ran out of memory{detail}"
    if status == pb.EXECUTION_STATUS_FAILED_TO_START:
        return EXIT_FAILED_TO_START, f"FAILED_TO_START: the command could not be started{detail}"
    if status == pb.EXECUTION_STATUS_OUTPUT_LIMIT_EXCEEDED:
        return EXIT_OUTPUT_LIMIT, f"OUTPUT_LIMIT_EXCEEDED: outputs not collected{detail}"
    name = pb.ExecutionStatus.Name(status) if status in pb.ExecutionStatus.values() else str(status)
    return EXIT_INFRASTRUCTURE, f"{name}: the worker failed to run the action{detail}"


def _signal_name(number: int) -> str:
    try:
        return f"{number} ({signal.Signals(number).name})"
    except ValueError:
        return str(number)


def _binary_sink(stream: BinaryIO) -> Callable[[bytes], None]:
    def sink(data: bytes) -> None:
        stream.write(data)
        stream.flush()

    return sink


def run_exec(args: argparse.Namespace) -> int:
    """Handler of ``exec``: upload, run, stream, download; return the exit code documented above."""
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        _say("exec", "no command given: put it after --, e.g. exec --target HOST:PORT -- echo hi")
        return EXIT_USAGE
    try:
        inputs = collect_inputs(parse_input_spec(spec) for spec in args.input)
    except WorkerError as err:
        _say("exec", str(err))
        return EXIT_USAGE
    request = build_request(args, argv)
    inputs.add_to(request)
    output_dir = Path(args.output_dir)
    if args.output:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            _say("exec", f"cannot create output directory {output_dir}: {err.strerror}")
            return EXIT_USAGE
    client = _open("exec", args)
    if client is None:
        return EXIT_USAGE
    stdout, stderr = sys.stdout.buffer, sys.stderr.buffer
    sys.stdout.flush()
    sys.stderr.flush()
    reach = _Reachability(client.channel)
    unenforced: list[str] = []
    try:
        reach.wait(_CONNECT_TIMEOUT_SECONDS)
        if args.image or args.cpus is not None or args.memory is not None:
            executor = chosen_executor(args, client.get_capabilities())
            if executor is not None and args.image and not is_container(executor):
                _say("exec", f"warning: {image_ignored(executor)}")
            unenforced = [] if executor is None else unenforced_options(args, executor)
        client.upload_inputs(inputs)
        result = client.run(
            request,
            stdout=_binary_sink(stdout),
            stderr=_binary_sink(stderr),
            outputs=OutputWriter(destination=output_dir) if args.output else None,
        )
    except KeyboardInterrupt:
        _say("exec", "CANCELLED: interrupted; the remote action was cancelled")
        return EXIT_CANCELLED
    except grpc.RpcError as err:
        return _rpc_failure("exec", args.target, err, reach)
    except (WorkerError, OSError) as err:
        _say("exec", f"failed: {err}")
        return EXIT_INFRASTRUCTURE
    finally:
        reach.close()
        client.close()
    for name, summary in (("stdout", result.stdout), ("stderr", result.stderr)):
        if summary.truncated:
            _say(
                "exec",
                f"{name} truncated by the worker's cap: {summary.streamed_bytes} of "
                f"{summary.size_bytes} bytes shown",
            )
    if result.status != pb.EXECUTION_STATUS_FAILED_TO_START:  # it ran: the worker accepted the limits
        for option in unenforced:
            said = f"{option} was not enforced by executor {result.executor!r}: the command ran without it"
            _say("exec", f"warning: {said}")
    for path in missing_outputs(args.output, result):
        _say("exec", f"warning: output {path} was not produced")
    code, explanation = exit_status(result)
    if explanation is not None:
        _say("exec", explanation)
    return code


def chosen_executor(
    args: argparse.Namespace, caps: pb.GetCapabilitiesResponse
) -> pb.ExecutorCapabilities | None:
    """The executor ``args`` asks for (the worker's default when none), or None when the worker has
    no such executor (it refuses the request itself)."""
    name = args.executor or (caps.executors[0].name if caps.executors else "")
    return next((ex for ex in caps.executors if ex.name == name), None)


def is_container(executor: pb.ExecutorCapabilities) -> bool:
    return executor.isolation_level in (pb.ISOLATION_LEVEL_CONTAINER, pb.ISOLATION_LEVEL_VIRTUALIZED)


def image_ignored(executor: pb.ExecutorCapabilities) -> str:
    level = pb.IsolationLevel.Name(executor.isolation_level).removeprefix("ISOLATION_LEVEL_").lower()
    return (
        f"--image does not apply to executor {executor.name!r} (isolation {level}, not a container): "
        "the image is ignored"
    )


def unenforced_options(args: argparse.Namespace, executor: pb.ExecutorCapabilities) -> list[str]:
    """The limit options given that ``executor`` lists as not enforced. Said only once the action
    ran: an executor that refuses such limits (refuse_unenforceable_limits) says so itself."""
    return [
        option
        for option, given, limit in (
            ("--cpus", args.cpus is not None, pb.RESOURCE_LIMIT_CPU),
            ("--memory", args.memory is not None, pb.RESOURCE_LIMIT_MEMORY),
        )
        if given and limit in executor.unenforced_limits
    ]


def missing_outputs(requested: Sequence[str], result: pb.ExecutionResult) -> list[str]:
    """The requested outputs the command did not produce (none when it did not complete: the
    explanation of its status says why)."""
    if result.status != pb.EXECUTION_STATUS_COMPLETED:
        return []
    produced = {
        entry.path
        for entries in (result.output_files, result.output_directories, result.output_symlinks)
        for entry in entries
    }
    return [path for path in requested if path.rstrip("/") not in produced]


def run_capabilities(args: argparse.Namespace) -> int:
    """Handler of ``capabilities``."""
    client = _open("capabilities", args, rpc_timeout=_CONNECT_TIMEOUT_SECONDS)
    if client is None:
        return EXIT_USAGE
    reach = _Reachability(client.channel)
    try:
        reach.wait(_CONNECT_TIMEOUT_SECONDS)
        caps = client.get_capabilities()
    except grpc.RpcError as err:
        return _rpc_failure("capabilities", args.target, err, reach)
    finally:
        reach.close()
        client.close()
    if args.json:
        sys.stdout.write(json_format.MessageToJson(caps) + "\n")
    else:
        sys.stdout.write(format_capabilities(caps))
    sys.stdout.flush()
    return 0


def run_health(args: argparse.Namespace) -> int:
    """Handler of ``health``: prints the status name; 0 only for SERVING."""
    client = _open("health", args, rpc_timeout=_CONNECT_TIMEOUT_SECONDS)
    if client is None:
        return EXIT_USAGE
    reach = _Reachability(client.channel)
    try:
        reach.wait(_CONNECT_TIMEOUT_SECONDS)
        status = client.check_health(args.service)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            _say("health", f"worker at {args.target} knows no service {args.service!r}")
            print("SERVICE_UNKNOWN", flush=True)
            return EXIT_NOT_SERVING
        return _rpc_failure("health", args.target, err, reach)
    finally:
        reach.close()
        client.close()
    print(status, flush=True)
    return 0 if status == "SERVING" else EXIT_NOT_SERVING


def _bytes(n: int) -> str:
    if n == 0:
        return "none"
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f} {unit}" if n % size else f"{n // size} {unit}"
    return f"{n} B"


def _limits(limits: pb.ResourceLimits) -> str:
    parts = []
    if limits.cpu_cores:
        parts.append(f"cpus {limits.cpu_cores:g}")
    if limits.memory_bytes:
        parts.append(f"memory {_bytes(limits.memory_bytes)}")
    if limits.max_processes:
        parts.append(f"processes {limits.max_processes}")
    if limits.network:
        parts.append(
            f"network {pb.NetworkAccess.Name(limits.network).removeprefix('NETWORK_ACCESS_').lower()}"
        )
    return ", ".join(parts) or "none"


def _limit_names(values: Sequence[int]) -> str:
    names = [pb.ResourceLimit.Name(v).removeprefix("RESOURCE_LIMIT_").lower() for v in values]
    return ", ".join(names) or "none"


def format_capabilities(caps: pb.GetCapabilitiesResponse) -> str:
    """A readable, stable rendering of GetCapabilities for operators."""
    v, p, lim = caps.versions, caps.platform, caps.limits
    lines = [
        f"worker {v.worker} (api {v.api}, python {v.python}, grpc {v.grpc})"
        + (f", id {caps.worker_id}" if caps.worker_id else ""),
        f"platform: {p.os} {p.arch}, {p.cpu_count} CPUs, {_bytes(p.memory_bytes)} memory, "
        f"kernel {p.kernel_release}",
        f"concurrency: {caps.max_concurrent_executions} running, {caps.max_queued_executions} queued",
        f"limits: request {_bytes(lim.max_request_bytes)}, "
        f"inline inputs {_bytes(lim.max_inline_input_bytes)}, "
        f"logs {_bytes(lim.max_log_bytes_per_stream)} per stream, outputs {_bytes(lim.max_output_bytes)}, "
        f"timeout {lim.default_timeout.ToTimedelta().total_seconds():g}s default, "
        f"{lim.max_timeout.ToTimedelta().total_seconds():g}s max",
        "executors:",
    ]
    for i, ex in enumerate(caps.executors):
        level = pb.IsolationLevel.Name(ex.isolation_level).removeprefix("ISOLATION_LEVEL_").lower()
        ready = "ready" if ex.ready else f"NOT READY: {ex.readiness_message}"
        lines.append(f"  {ex.name}{' (default)' if i == 0 else ''}: isolation {level}, {ready}")
        lines.append(f"    enforces: {_limit_names(ex.enforced_limits)}")
        lines.append(f"    cannot enforce: {_limit_names(ex.unenforced_limits)}")
        lines.append(f"    default limits: {_limits(ex.default_limits)}")
        lines.append(f"    max limits: {_limits(ex.max_limits)}")
        for key in sorted(ex.details):
            lines.append(f"    {key}: {ex.details[key]}")
        if ex.images_present:
            lines.append(f"    images: {', '.join(ex.images_present)}")
    return "\n".join(lines) + "\n"
