"""The ``exec``, ``capabilities`` and ``health`` commands against a real worker, as an operator runs them."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _pki import TOKEN, Pki, make_pki
from _support import BASE_ENV, wait_gone

import expbuild_worker
from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.cli import build_parser, main
from expbuild_worker.cli._client import DEFAULT_PATH, EXIT_CANCELLED, EXIT_FAILED_TO_START, EXIT_TIMED_OUT
from expbuild_worker.client import WorkerClient

PATH_ENV = "PATH=/usr/local/bin:/usr/bin:/bin"
SOURCE_ROOT = Path(expbuild_worker.__file__).resolve().parents[1]


def _cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The test's own environment (without the CLI's EXPBUILD_WORKER_* defaults) plus ``extra``,
    with this source tree first so the child runs the code under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXPBUILD_WORKER_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH", "")]))
    env.update(extra or {})
    return env


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m expbuild_worker ARGS`` and capture stdout and stderr apart, as bytes."""
    return subprocess.run(
        [sys.executable, "-m", "expbuild_worker", *args],
        capture_output=True,
        cwd=cwd,
        env=_cli_env(env),
        timeout=timeout,
        check=False,
    )


def cli_popen(*args: str, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "expbuild_worker", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=cwd,
        env=_cli_env(),
    )


def exec_args(target: str, *argv: str, extra: tuple[str, ...] = ()) -> list[str]:
    return ["exec", "--target", target, "--env", PATH_ENV, *extra, "--", *argv]


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_stdout_and_stderr_are_byte_exact_and_separate(worker_target: str) -> None:
    """Binary bytes, NULs and a missing trailing newline reach the right local stream unchanged."""
    script = r"printf 'out\000\377\n'; printf 'err\001' >&2; printf 'tail-no-newline'; printf 'E2' >&2"
    proc = cli(*exec_args(worker_target, "/bin/sh", "-c", script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"out\x00\xff\ntail-no-newline"
    assert proc.stderr == b"err\x01E2"


def test_large_binary_stdout_is_intact(worker_target: str) -> None:
    """Several MiB of binary stdout arrive byte for byte (many chunks, reassembled in order)."""
    proc = cli(*exec_args(worker_target, "/bin/sh", "-c", "head -c 5000000 /dev/urandom | tee /dev/stderr"))
    assert proc.returncode == 0
    assert len(proc.stdout) == 5_000_000
    assert proc.stdout == proc.stderr


@pytest.mark.parametrize("code", [0, 1, 255], ids=["zero", "one", "max"])
def test_exit_code_is_the_remote_exit_code(worker_target: str, code: int) -> None:
    """Scripts see the remote command's own exit code, with nothing added on stderr."""
    proc = cli(*exec_args(worker_target, "/bin/sh", "-c", f"exit {code}"))
    assert proc.returncode == code
    assert proc.stderr == b""


def test_death_by_signal_is_128_plus_n(worker_target: str) -> None:
    """A command killed by SIGTERM exits 143 locally, like a shell reports it, explained on stderr."""
    proc = cli(*exec_args(worker_target, "/bin/sh", "-c", "kill -TERM $$"))
    assert proc.returncode == 128 + signal.SIGTERM
    assert b"signal 15 (SIGTERM)" in proc.stderr
    assert proc.stderr.count(b"\n") == 1


def test_timeout_has_its_own_code(worker_target: str) -> None:
    """A command past --timeout is killed and reported as TIMED_OUT with the documented code."""
    proc = cli(*exec_args(worker_target, "/bin/sleep", "600", extra=("--timeout", "1")), timeout=30)
    assert proc.returncode == EXIT_TIMED_OUT
    assert b"TIMED_OUT" in proc.stderr


def test_missing_program_is_failed_to_start(worker_target: str) -> None:
    """A program that does not exist is FAILED_TO_START, not an exit code the program never returned."""
    proc = cli(*exec_args(worker_target, "/nonexistent/program"))
    assert proc.returncode == EXIT_FAILED_TO_START
    assert b"FAILED_TO_START" in proc.stderr


def test_output_streams_while_the_command_runs(worker_target: str) -> None:
    """The first line reaches local stdout while the remote command is still sleeping."""
    proc = cli_popen(*exec_args(worker_target, "/bin/sh", "-c", "echo first; sleep 2; echo second"))
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"first\n"
        assert proc.poll() is None, "the CLI ended before the remote command did"
        assert proc.stdout.read() == b"second\n"
        assert proc.wait(30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_ctrl_c_cancels_the_remote_action(worker_target: str) -> None:
    """Ctrl-C exits 130 and the remote process is killed, not left running on the worker."""
    proc = cli_popen(*exec_args(worker_target, "/bin/sh", "-c", "echo $$; exec sleep 600"))
    try:
        assert proc.stdout is not None and proc.stderr is not None
        remote_pid = int(proc.stdout.readline())
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == EXIT_CANCELLED
        assert b"CANCELLED" in proc.stderr.read()
        assert wait_gone(remote_pid, timeout=10), f"remote process {remote_pid} survived the cancel"
    finally:
        proc.kill()
        proc.wait()


def test_inputs_up_and_outputs_down(worker_target: str, tmp_path: Path) -> None:
    """A file and a directory go up; outputs come back with bytes, sha256 and exec bits intact."""
    local = tmp_path / "local"
    (local / "data" / "sub").mkdir(parents=True)
    (local / "data" / "a.txt").write_bytes(b"alpha\n")
    (local / "data" / "sub" / "b.bin").write_bytes(bytes(range(256)))
    big = os.urandom(3 * 1024 * 1024 + 17)  # several upload pieces and output chunks
    (local / "big.bin").write_bytes(big)
    tool = local / "tool.sh"
    tool.write_bytes(b"#!/bin/sh\necho tool ran\n")
    tool.chmod(0o755)
    script = (
        "set -e; ./bin/tool.sh; mkdir -p out/nested/empty; "
        "cat data/a.txt data/sub/b.bin > out/nested/joined; cp bin/tool.sh out/tool.sh; "
        "cp big.bin out/big.bin; : > out/empty; ln -s tool.sh out/link"
    )
    dest = tmp_path / "dest"
    proc = cli(
        *exec_args(
            worker_target,
            "/bin/sh",
            "-c",
            script,
            extra=("--input", "data", "--input", "tool.sh:bin/tool.sh", "--input", str(local / "big.bin"),
                   "--output", "out", "--output-dir", str(dest)),
        ),
        cwd=local,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"tool ran\n"
    out = dest / "out"
    assert (out / "nested" / "joined").read_bytes() == b"alpha\n" + bytes(range(256))
    assert hashlib.sha256((out / "big.bin").read_bytes()).hexdigest() == hashlib.sha256(big).hexdigest()
    assert (out / "tool.sh").read_bytes() == tool.read_bytes()
    assert stat.S_IMODE((out / "tool.sh").stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "big.bin").stat().st_mode) == 0o644
    assert (out / "empty").read_bytes() == b""
    assert (out / "nested" / "empty").is_dir()
    assert os.readlink(out / "link") == "tool.sh"


def test_single_output_file_lands_in_the_current_directory(worker_target: str, tmp_path: Path) -> None:
    """Without --output-dir, outputs are written under the current directory at their remote path."""
    proc = cli(
        *exec_args(worker_target, "/bin/sh", "-c", "printf result > r.txt", extra=("--output", "r.txt")),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.txt").read_bytes() == b"result"


def test_outputs_are_downloaded_even_when_the_command_fails(worker_target: str, tmp_path: Path) -> None:
    """A failing build's logs and reports are what a user needs most; they come back with its code."""
    proc = cli(
        *exec_args(
            worker_target, "/bin/sh", "-c", "echo report > log.txt; exit 3", extra=("--output", "log.txt")
        ),
        cwd=tmp_path,
    )
    assert proc.returncode == 3
    assert (tmp_path / "log.txt").read_bytes() == b"report\n"


def test_workdir_and_environment(worker_target: str) -> None:
    """--workdir sets the directory; the environment is --env plus the default PATH, nothing local."""
    proc = cli(
        "exec", "--target", worker_target, "--workdir", "w/d", "--env", "ONLY=this",
        "--", "/bin/sh", "-c", 'pwd | grep -q "/w/d$" && env | sort | grep -v "^PWD=\\|^SHLVL=\\|^_="',
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"ONLY=this\nPATH={DEFAULT_PATH}\n".encode()


def test_program_is_found_on_the_default_path(worker_target: str) -> None:
    """``exec -- echo hi`` just works: PATH defaults to the standard directories."""
    proc = cli("exec", "--target", worker_target, "--", "echo", "hi")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"hi\n", b"")


def test_unreadable_input_is_a_usage_error(worker_target: str, tmp_path: Path) -> None:
    """A typo in --input fails before anything runs, naming the path."""
    proc = cli(*exec_args(worker_target, "/bin/true", extra=("--input", "no-such-file")), cwd=tmp_path)
    assert proc.returncode == 2
    assert b"no-such-file" in proc.stderr


def test_exec_against_a_dead_port_is_an_infrastructure_failure(tmp_path: Path) -> None:
    """No worker answering is told apart from any remote exit code, in one line."""
    proc = cli(*exec_args(f"127.0.0.1:{free_port()}", "/bin/true"), timeout=30)
    assert proc.returncode == 125
    assert proc.stderr.startswith(b"expbuild-worker exec: cannot reach worker")
    assert proc.stderr.count(b"\n") == 1


def test_refused_request_is_an_infrastructure_failure(
    worker_target: str, capfd: pytest.CaptureFixture[str]
) -> None:
    """A request the worker refuses (INVALID_ARGUMENT) names the status and the field."""
    code = main(["exec", "--target", worker_target, "--workdir", "../escape", "--", "/bin/true"])
    assert code == 125
    err = capfd.readouterr().err
    assert "INVALID_ARGUMENT" in err and "working_directory" in err


def test_health_serving(worker_target: str) -> None:
    """A running worker reports SERVING and the command exits 0, so it fits a probe script."""
    proc = cli("health", "--target", worker_target)
    assert (proc.returncode, proc.stdout) == (0, b"SERVING\n")


def test_health_of_a_named_service(worker_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The worker's own service has its health status too."""
    assert main(["health", "--target", worker_target, "--service", "expbuild.worker.v1.WorkerService"]) == 0
    assert capsys.readouterr().out == "SERVING\n"


def test_health_of_a_draining_worker_is_not_serving(start_worker: Callable[..., Any]) -> None:
    """A worker shutting down (still draining an action) says NOT_SERVING and the probe fails."""
    worker = start_worker({"server": {"shutdown_grace_seconds": 60.0}})
    with (
        WorkerClient(worker.target) as client,
        client.execute(pb.ExecuteRequest(argv=["/bin/sleep", "600"], environment=BASE_ENV)) as execution,
    ):
        events = iter(execution)
        while next(events).WhichOneof("event") != "started":
            pass
        stopping = asyncio.run_coroutine_threadsafe(worker.server.stop(), worker.loop)
        try:
            deadline = time.monotonic() + 10
            proc = cli("health", "--target", worker.target)
            while proc.stdout != b"NOT_SERVING\n" and time.monotonic() < deadline:
                proc = cli("health", "--target", worker.target)
            assert (proc.returncode, proc.stdout) == (1, b"NOT_SERVING\n")
        finally:
            client.cancel_execution(execution.execution_id)
            stopping.result(30)


def test_health_against_a_dead_port_fails_cleanly() -> None:
    """No worker: one clear line on stderr, no traceback, a non-zero exit, within a few seconds."""
    proc = cli("health", "--target", f"127.0.0.1:{free_port()}", timeout=30)
    assert proc.returncode != 0
    assert proc.stdout == b""
    assert proc.stderr.startswith(b"expbuild-worker health: cannot reach worker at 127.0.0.1:")
    assert b"Traceback" not in proc.stderr


def test_capabilities_lists_the_host_executor(worker_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Operators see the host executor, its isolation and what it cannot enforce."""
    assert main(["capabilities", "--target", worker_target]) == 0
    out = capsys.readouterr().out
    assert "  host (default): isolation host, ready" in out
    assert "cannot enforce:" in out and "network" in out


def test_capabilities_as_json(worker_target: str, capsys: pytest.CaptureFixture[str]) -> None:
    """--json prints the response in the protobuf JSON mapping, for scripts."""
    assert main(["capabilities", "--target", worker_target, "--json"]) == 0
    caps = json.loads(capsys.readouterr().out)
    assert caps["executors"][0]["name"] == "host"
    assert caps["executors"][0]["isolationLevel"] == "ISOLATION_LEVEL_HOST"


def test_truncated_log_is_flagged_on_stderr(start_worker: Callable[..., Any]) -> None:
    """When the worker's log cap cuts stdout, the user is told how much was shown, never silently."""
    worker = start_worker({"execution": {"max_log_bytes_per_stream": 1000}})
    proc = cli(*exec_args(worker.target, "/bin/sh", "-c", "head -c 5000 /dev/zero"))
    assert proc.returncode == 0
    assert proc.stdout == b"\0" * 1000
    assert (
        proc.stderr
        == b"expbuild-worker exec: stdout truncated by the worker's cap: 1000 of 5000 bytes shown\n"
    )


def test_version_names_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    """Bug reports and deployment checks need to know which worker CLI is installed."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"expbuild-worker {expbuild_worker.__version__}\n"


@pytest.mark.parametrize(
    "command",
    [[], ["serve"], ["bot"], ["exec"], ["capabilities"], ["health"]],
    ids=["main", "serve", "bot", "exec", "capabilities", "health"],
)
def test_help_reads_as_plain_text(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Help is read in a terminal: no reStructuredText or Markdown markup leaks into it."""
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: expbuild-worker")
    for markup in ("``", ":ref:", ":func:", ":class:", "**"):
        assert markup not in out, f"{markup!r} in the help of {command}"


@pytest.mark.parametrize("command", ["exec", "capabilities", "health"])
def test_client_help_documents_the_environment(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Settings a shell profile can hold must be discoverable where users look: --help."""
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for name in ("TARGET", "TLS_CA", "TLS_CERT", "TLS_KEY", "TOKEN_FILE", "SERVER_NAME"):
        assert f"EXPBUILD_WORKER_{name}" in out


def test_target_defaults_to_the_local_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    """``make run`` serves 127.0.0.1:50051, so the client commands find it without --target."""
    monkeypatch.delenv("EXPBUILD_WORKER_TARGET", raising=False)
    for command in (["health"], ["capabilities"], ["exec", "--", "true"]):
        assert build_parser().parse_args(command).target == "127.0.0.1:50051"


def test_target_comes_from_the_environment(worker_target: str) -> None:
    """A shell that exported EXPBUILD_WORKER_TARGET talks to that worker without --target."""
    env = {"EXPBUILD_WORKER_TARGET": worker_target}
    assert cli("health", env=env).stdout == b"SERVING\n"
    proc = cli("exec", "--", "echo", "found", env=env)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"found\n", b"")


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "cli")


def _tls_worker(start_worker: Callable[..., Any], pki: Pki, *, mutual: bool = False) -> Any:
    server: dict[str, Any] = {
        "tls_certificate_file": str(pki.server_cert),
        "tls_private_key_file": str(pki.server_key),
    }
    if mutual:
        server["tls_client_ca_file"] = str(pki.ca)
    return start_worker({"server": server})


def test_exec_over_tls_with_the_ca_option(start_worker: Callable[..., Any], pki: Pki) -> None:
    """--tls-ca is all a TLS worker needs from its users: commands run over the encrypted channel."""
    worker = _tls_worker(start_worker, pki)
    proc = cli("exec", "--target", worker.target, "--tls-ca", str(pki.ca), "--", "echo", "over tls")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"over tls\n", b"")


def test_plaintext_against_a_tls_worker_cannot_reach_it(start_worker: Callable[..., Any], pki: Pki) -> None:
    """No TLS handshake means no connection: the user is told the worker could not be reached."""
    worker = _tls_worker(start_worker, pki)
    proc = cli("capabilities", "--target", worker.target, timeout=30)
    assert proc.returncode == 125
    assert proc.stderr.startswith(
        f"expbuild-worker capabilities: cannot reach worker at {worker.target}".encode()
    )


def test_mutual_tls_from_the_environment(start_worker: Callable[..., Any], pki: Pki) -> None:
    """CA, client certificate and key exported once serve every command, as --tls-* would."""
    worker = _tls_worker(start_worker, pki, mutual=True)
    env = {
        "EXPBUILD_WORKER_TARGET": worker.target,
        "EXPBUILD_WORKER_TLS_CA": str(pki.ca),
        "EXPBUILD_WORKER_TLS_CERT": str(pki.client_cert),
        "EXPBUILD_WORKER_TLS_KEY": str(pki.client_key),
    }
    proc = cli("capabilities", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["executors"][0]["name"] == "host"
    proc = cli("exec", "--", "echo", "mutual", env=env)
    assert (proc.returncode, proc.stdout) == (0, b"mutual\n"), proc.stderr


@pytest.mark.parametrize(
    ("server_name", "reached"),
    [("localhost", True), ("elsewhere.invalid", False)],
    ids=["listed", "unlisted"],
)
def test_server_name_is_the_name_the_certificate_must_carry(
    start_worker: Callable[..., Any], pki: Pki, server_name: str, reached: bool
) -> None:
    """--server-name checks the certificate for that name: one it lists connects, another does not."""
    worker = _tls_worker(start_worker, pki)
    proc = cli(
        "health", "--target", worker.target, "--tls-ca", str(pki.ca), "--server-name", server_name, timeout=30
    )
    if reached:
        assert (proc.returncode, proc.stdout) == (0, b"SERVING\n"), proc.stderr
    else:
        assert proc.returncode == 125
        assert b"cannot reach worker at" in proc.stderr


@pytest.fixture
def token_worker(start_worker: Callable[..., Any], tmp_path: Path) -> tuple[Any, Path]:
    token_file = tmp_path / "ci.token"
    token_file.write_text(TOKEN + "\n")
    return start_worker({"server": {"tokens": [{"name": "ci", "file": str(token_file)}]}}), token_file


def test_exec_with_a_token_file(token_worker: tuple[Any, Path]) -> None:
    """--token-file sends the bearer token: the command runs."""
    worker, token_file = token_worker
    proc = cli("exec", "--target", worker.target, "--token-file", str(token_file), "--", "echo", "let in")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, b"let in\n", b"")


def test_a_refused_token_is_reported_as_the_workers_answer(token_worker: tuple[Any, Path]) -> None:
    """A worker that said UNAUTHENTICATED was reached: the user sees its answer, not "cannot reach"."""
    worker, _ = token_worker
    proc = cli("exec", "--target", worker.target, "--", "true")
    assert proc.returncode == 125
    line = proc.stderr.decode()
    assert line.startswith(f"expbuild-worker exec: worker at {worker.target} answered UNAUTHENTICATED: ")
    assert "cannot reach" not in line and line.count("\n") == 1


def test_health_needs_no_token(token_worker: tuple[Any, Path]) -> None:
    """Probes have no credentials; the health service answers them on a token-protected worker."""
    worker, _ = token_worker
    assert cli("health", "--target", worker.target).stdout == b"SERVING\n"


def test_an_unreadable_token_file_is_a_usage_error(worker_target: str, tmp_path: Path) -> None:
    """A typo in --token-file fails before any call, naming the file."""
    missing = tmp_path / "no.token"
    proc = cli("capabilities", "--target", worker_target, "--token-file", str(missing))
    assert proc.returncode == 2
    assert str(missing).encode() in proc.stderr


def test_a_draining_worker_is_reported_as_what_it_answered(start_worker: Callable[..., Any]) -> None:
    """A worker shutting down was reached and said UNAVAILABLE with its reason; "cannot reach" would lie."""
    worker = start_worker({"server": {"shutdown_grace_seconds": 60.0}})
    with (
        WorkerClient(worker.target) as client,
        client.execute(pb.ExecuteRequest(argv=["/bin/sleep", "600"], environment=BASE_ENV)) as execution,
    ):
        events = iter(execution)
        while next(events).WhichOneof("event") != "started":
            pass
        stopping = asyncio.run_coroutine_threadsafe(worker.server.stop(), worker.loop)
        try:
            deadline = time.monotonic() + 10
            while cli("health", "--target", worker.target).stdout != b"NOT_SERVING\n":
                assert time.monotonic() < deadline, "the worker never started draining"
            proc = cli("exec", "--target", worker.target, "--", "true")
            assert proc.returncode == 125
            said = f"worker at {worker.target} answered UNAVAILABLE: worker is shutting down"
            assert proc.stderr.decode().startswith(f"expbuild-worker exec: {said}")
        finally:
            client.cancel_execution(execution.execution_id)
            stopping.result(30)


def test_an_output_that_was_not_produced_is_warned_about(worker_target: str, tmp_path: Path) -> None:
    """A typo in --output or a build that skipped a file is said, not silently left missing."""
    proc = cli(
        *exec_args(worker_target, "/bin/sh", "-c", "echo made > made.txt",
                   extra=("--output", "made.txt", "--output", "missing.txt", "--output", "gone/")),
        cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0
    assert (tmp_path / "made.txt").read_bytes() == b"made\n"
    assert proc.stderr.decode().splitlines() == [
        "expbuild-worker exec: warning: output missing.txt was not produced",
        "expbuild-worker exec: warning: output gone/ was not produced",
    ]


def test_an_image_on_the_host_executor_is_warned_about(worker_target: str) -> None:
    """The host executor ignores --image: the user learns the command did not run in that image."""
    proc = cli(*exec_args(worker_target, "/bin/echo", "ran", extra=("--image", "busybox:latest")))
    assert (proc.returncode, proc.stdout) == (0, b"ran\n")
    assert proc.stderr.decode() == (
        "expbuild-worker exec: warning: --image does not apply to executor 'host' (isolation host, "
        "not a container): the image is ignored\n"
    )


@pytest.mark.parametrize("refuse", [False, True], ids=["runs-without", "refuses"])
def test_a_limit_the_executor_cannot_enforce_is_said(start_worker: Callable[..., Any], refuse: bool) -> None:
    """An unenforceable limit: a worker that runs anyway is warned about, one that refuses says so."""
    worker = start_worker({"executor": {"host": {"type": "host", "refuse_unenforceable_limits": refuse}}})
    with WorkerClient(worker.target) as client:
        unenforced = set(client.get_capabilities().executors[0].unenforced_limits)
    assert pb.RESOURCE_LIMIT_CPU in unenforced, "a plain process shares every host CPU"
    option = "--cpus"
    proc = cli(*exec_args(worker.target, "/bin/echo", "ran", extra=(option, "1")))
    lines = proc.stderr.decode().splitlines()
    if refuse:
        assert proc.returncode == 125
        assert len(lines) == 1, lines
        assert lines[0].startswith(
            f"expbuild-worker exec: worker at {worker.target} answered FAILED_PRECONDITION:"
        )
    else:
        assert (proc.returncode, proc.stdout) == (0, b"ran\n")
        warning = f"{option} was not enforced by executor 'host': the command ran without it"
        assert lines == [f"expbuild-worker exec: warning: {warning}"]


def test_make_run_passes_the_port() -> None:
    """``make run PORT=…`` starts a second worker beside the first, as the README says."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    proc = subprocess.run(
        ["make", "-n", "run", "PORT=50052"], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True
    )
    assert "expbuild-worker serve --config configs/worker/expbuild-worker.toml --port 50052" in proc.stdout
