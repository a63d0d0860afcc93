"""A private PostgreSQL, BuildGrid all-in-one in its own virtualenv, bots and Bazel, for tests and benchmarks.

Every server binds 127.0.0.1, and every process started here dies with the process that started
it (a parent-death signal), so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_VENV = ROOT / ".cache" / "buildgrid-venv"
INSTANCE = "main"
START_SECONDS = 90
BAZEL_SECONDS = 420
CONTAINER_IMAGE = "expbuild-test/busybox:1"
"""The image the container-platform action asks for; the Docker test fixtures build it from busybox."""


class HarnessError(AssertionError):
    """A server did not start or a command failed; the message carries the end of its log."""


def buildgrid_venv() -> Path:
    return Path(os.environ.get("EXPBUILD_BUILDGRID_VENV") or DEFAULT_VENV)


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL server's bin directory (Debian installs them side by side)."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


def missing_requirements() -> str | None:
    """Why BuildGrid cannot run here (None when it can)."""
    if postgres_bindir() is None:
        return "no PostgreSQL server (Debian: apt-get install postgresql; or scripts/ensure-buildgrid.sh)"
    if not (buildgrid_venv() / "bin" / "bgd").is_file():
        return f"no BuildGrid virtualenv at {buildgrid_venv()} (run scripts/ensure-buildgrid.sh)"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _guarded(argv: list[str], sig: signal.Signals, user: str | None = None) -> list[str]:
    """``argv`` run so that it gets ``sig`` when the process that started it dies (util-linux's
    setpriv sets the parent-death signal after switching to ``user``, if given)."""
    if shutil.which("setpriv") is None:
        return argv
    switch = [f"--reuid={user}", f"--regid={user}", "--init-groups"] if user else []
    return ["setpriv", *switch, "--pdeathsig", sig.name.removeprefix("SIG"), "--", *argv]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise HarnessError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.2)
    raise HarnessError(f"{what} did not listen on 127.0.0.1:{port} within {START_SECONDS}s:\n{_tail(log)}")


def _stop(
    proc: subprocess.Popen[bytes] | None, sig: signal.Signals = signal.SIGTERM, grace: float = 20
) -> None:
    """Signal our own child by its pid, wait, and kill it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


@dataclass
class Postgres:
    """A throw-away PostgreSQL cluster on a loopback port, run by an unprivileged user, data in ``root``."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    def _account(self) -> tuple[str | None, int, int]:
        """Who runs the server: this user, or (PostgreSQL refuses root) the postgres account."""
        if os.geteuid() != 0:
            return None, os.getuid(), os.getgid()
        for name in ("postgres", "nobody"):
            with contextlib.suppress(KeyError):
                entry = pwd.getpwnam(name)
                return name, entry.pw_uid, entry.pw_gid
        raise HarnessError("no unprivileged account (postgres or nobody) to run PostgreSQL as")

    @property
    def url(self) -> str:
        # psycopg2 explicitly: with the plain postgresql:// scheme BuildGrid's notifier misses
        # every notification and each action waits for a keep-alive instead.
        return f"postgresql+psycopg2://bgd@127.0.0.1:{self.port}/bgd"

    def start(self) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise HarnessError("no PostgreSQL server installed")
        user, uid, gid = self._account()
        data = self.root / "pgdata"
        # The socket directory lives in the system tmp with a short name: socket paths are short.
        self._sockets = Path(tempfile.mkdtemp(prefix="expbuild-pg-"))
        for path in (self.root, self._sockets):
            path.mkdir(parents=True, exist_ok=True)
            os.chown(path, uid, gid)
        self.root.chmod(0o700)
        as_user = {"user": uid, "group": gid, "extra_groups": []} if user is not None else {}
        log = self.root / "postgres.log"
        if not data.exists():
            done = subprocess.run(
                [
                    str(bindir / "initdb"),
                    "-D",
                    str(data),
                    "-U",
                    "bgd",
                    "--auth=trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                ],
                capture_output=True,
                cwd=self.root,
                check=False,
                **as_user,  # type: ignore[arg-type]
            )
            if done.returncode != 0:
                raise HarnessError(f"initdb failed:\n{done.stdout.decode()}{done.stderr.decode()}")
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(
                _guarded([
                    str(bindir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    f"unix_socket_directories={self._sockets}",
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    "max_connections=300",
                ], signal.SIGINT, user),  # SIGINT: PostgreSQL's fast shutdown
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
            )  # fmt: skip
        _wait_port(self.port, self.proc, log, "PostgreSQL")
        for _ in range(50):
            made = subprocess.run(
                [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "bgd", "-d", "postgres",
                 "-tAc", "SELECT 1 FROM pg_database WHERE datname = 'bgd'"],
                capture_output=True, check=False,
            )  # fmt: skip
            if made.returncode == 0:
                if made.stdout.strip() != b"1":
                    createdb = [str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)]
                    subprocess.run([*createdb, "-U", "bgd", "bgd"], check=True, capture_output=True)
                return
            time.sleep(0.2)
        raise HarnessError(f"PostgreSQL did not accept connections:\n{_tail(log)}")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGINT)
        shutil.rmtree(getattr(self, "_sockets", self.root / "none"), ignore_errors=True)


BUILDGRID_CONFIG = """\
server:
  - !channel
    address: "127.0.0.1:{port}"
    insecure-mode: true

authorization:
  method: none

monitoring:
  enabled: false

connections:
  - !sql-connection &sql
    connection-string: {url}
    pool-size: 10
    pool-timeout: 30
    max-overflow: 20

storages:
  - !disk-storage &cas
    path: {cas}

caches:
  - !lru-action-cache &ac
    storage: *cas
    max-cached-refs: 100000
    allow-updates: true
    cache-failed-actions: false

schedulers:
  - !sql-scheduler &scheduler
    sql: *sql
    storage: *cas
    action-cache: *ac
    # A bot that stops answering loses its leases to others this soon (the kill test relies on it).
    bot-session-keepalive-timeout: {keepalive}
    session-expiry-timer-interval: 1
    poll-interval: 0.5
    property-set: !dynamic-property-set
      match-property-keys: [container-image, isolation, executor]
    assigners:
      - !priority-age-assigner
        count: 1
        interval: 0.1

instances:
  - name: {instance}
    services:
      - !action-cache
        cache: *ac
      - !execution
        scheduler: *scheduler
      - !cas
        storage: *cas
      - !bytestream
        storage: *cas

thread-pool-size: 200
"""


@dataclass
class BuildGrid:
    """BuildGrid all-in-one (execution, bots, CAS, ByteStream, action cache on one instance) over ``db``."""

    root: Path
    db: Postgres
    keepalive_seconds: int = 10
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.root / "buildgrid.log"

    def start(self) -> None:
        venv = buildgrid_venv()
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "buildgrid.yml"
        config.write_text(
            BUILDGRID_CONFIG.format(
                port=self.port,
                url=self.db.url,
                cas=self.root / "cas",
                instance=INSTANCE,
                keepalive=self.keepalive_seconds,
            )
        )
        (self.root / "cas").mkdir(exist_ok=True)
        if not (self.root / ".migrated").exists():
            done = subprocess.run(
                [str(venv / "bin" / "bgd"), "migrate", "apply", self.db.url], capture_output=True, check=False
            )
            if done.returncode != 0:
                raise HarnessError(f"bgd migrate failed:\n{done.stdout.decode()}{done.stderr.decode()}")
            (self.root / ".migrated").touch()
        env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(self.root), "LANG": "C.UTF-8"}
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                _guarded([str(venv / "bin" / "bgd"), "server", "start", str(config)], signal.SIGKILL),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.root,
                env=env,
            )
        _wait_port(self.port, self.proc, self.log, "BuildGrid")

    def stop(self) -> None:
        _stop(self.proc, signal.SIGTERM, grace=15)
        self.proc = None


WORKER_CONFIG = """\
[server]
worker_id = "{bot_id}"
log_level = "info"
shutdown_grace_seconds = {grace}

[execution]
work_root = "{work_root}"
max_concurrent_executions = {capacity}

[worker_api]
enabled = true

[reapi]
enabled = false

[bot]
enabled = true
scheduler = "grpc://{target}"
instance_name = "{instance}"
bot_id = "{bot_id}"
capacity = {capacity}
container_images = [{images}]
poll_timeout_seconds = 20.0
reconnect_max_seconds = 2.0

[executor.host]
type = "host"
{docker}"""

DOCKER_EXECUTOR = """
[executor.docker]
type = "docker"
image = "{image}"
allowed_images = ["{image}"]
pull_policy = "never"
readonly_rootfs = false
user = "0:0"
"""


@dataclass
class BotProcess:
    """One ``expbuild-worker bot`` process with its own id and work root."""

    root: Path
    bot_id: str
    target: str
    capacity: int = 2
    docker_image: str | None = None
    grace_seconds: float = 10.0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / f"{self.bot_id}.log"

    def config_text(self) -> str:
        work_root = self.root / f"{self.bot_id}-work"
        return WORKER_CONFIG.format(
            bot_id=self.bot_id,
            grace=self.grace_seconds,
            work_root=work_root,
            capacity=self.capacity,
            target=self.target,
            instance=INSTANCE,
            images=f'"{self.docker_image}"' if self.docker_image else "",
            docker=DOCKER_EXECUTOR.format(image=self.docker_image) if self.docker_image else "",
        )

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / f"{self.bot_id}.toml"
        config.write_text(self.config_text())
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                _guarded(
                    [sys.executable, "-m", "expbuild_worker", "bot", "--config", str(config)], signal.SIGKILL
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_joined(self, sessions: int = 1) -> None:
        """Until the bot has opened ``sessions`` sessions in all (read from its log)."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise HarnessError(
                    f"bot {self.bot_id} exited with {self.proc.returncode}:\n{_tail(self.log)}"
                )
            if (
                self.log_text().count("session ")
                and len(re.findall(r"session \S+ opened", self.log_text())) >= sessions
            ):
                return
            time.sleep(0.2)
        raise HarnessError(f"bot {self.bot_id} opened no session within {START_SECONDS}s:\n{_tail(self.log)}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def reported(self) -> list[str]:
        """Action digests this bot reported with status 0 and a result (from its log)."""
        return re.findall(r"action (\S+) reported: status 0, exit code \d+", self.log_text())

    def running_leases(self) -> int:
        return len(re.findall(r"running as execution", self.log_text())) - len(self.reported())

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> int | None:
        _stop(self.proc, sig, grace=self.grace_seconds + 30)
        return self.proc.returncode if self.proc is not None else None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def workspace_build(
    independent: int = 20, chain: int = 4, sleep: float = 1.0, container: bool = False, salt: str = ""
) -> str:
    """A BUILD file: ``independent`` genrules that each sleep and write a distinct line, a chain
    of ``chain`` rules each reading the one before, and optionally one rule in a container.
    A ``salt`` changes every command (not its output), so no earlier result is a cache hit."""
    tail = f" # {salt}" if salt else ""
    rules = []
    for i in range(independent):
        rules.append(
            textwrap.dedent(f"""\
            genrule(
                name = "leaf_{i:02d}",
                outs = ["leaf_{i:02d}.txt"],
                cmd = "sleep {sleep} && printf 'leaf {i:02d}\\\\n' > $@{tail}",
            )
            """)
        )
    previous = ":leaf_00"
    for i in range(chain):
        rules.append(
            textwrap.dedent(f"""\
            genrule(
                name = "chain_{i}",
                srcs = ["{previous}"],
                outs = ["chain_{i}.txt"],
                cmd = "cat $< > $@ && printf 'link {i}\\\\n' >> $@{tail}",
            )
            """)
        )
        previous = f":chain_{i}"
    if container:
        rules.append(
            textwrap.dedent(f"""\
            genrule(
                name = "in_container",
                outs = ["in_container.txt"],
                cmd = "printf 'in a container\\\\n' > $@",
                exec_properties = {{"container-image": "docker://{CONTAINER_IMAGE}"}},
            )
            """)
        )
    return "\n".join(rules)


def expected_outputs(independent: int = 20, chain: int = 4, container: bool = False) -> dict[str, bytes]:
    out = {f"leaf_{i:02d}.txt": f"leaf {i:02d}\n".encode() for i in range(independent)}
    text = b"leaf 00\n"
    for i in range(chain):
        text += f"link {i}\n".encode()
        out[f"chain_{i}.txt"] = text
    if container:
        out["in_container.txt"] = b"in a container\n"
    return out


@dataclass
class Bazel:
    """Bazel over a generated workspace under ``root``; every cache is private to it, no server kept."""

    binary: str
    root: Path
    build_file: str

    def __post_init__(self) -> None:
        self.workspace = self.root / "workspace"
        self.workspace.mkdir(parents=True, exist_ok=True)
        (self.workspace / "WORKSPACE").write_text("")
        (self.workspace / "BUILD").write_text(self.build_file)
        (self.root / "home").mkdir(exist_ok=True)

    def build(self, target: str, *extra: str) -> subprocess.Popen[str]:
        """Start ``bazel build //...`` through the scheduler at ``target``; the caller waits on it."""
        argv = [
            self.binary,
            f"--output_user_root={self.root / 'output_user_root'}",
            "--batch",
            "--nohome_rc",
            "--noworkspace_rc",
            "build",
            f"--remote_executor=grpc://{target}",
            f"--remote_instance_name={INSTANCE}",
            "--spawn_strategy=remote",
            "--genrule_strategy=remote",
            "--noremote_local_fallback",
            "--remote_timeout=300",
            "--disk_cache=",
            "--incompatible_strict_action_env",
            "--shell_executable=/bin/sh",
            "--jobs=32",
            *extra,
            "//...",
        ]
        return subprocess.Popen(
            argv,
            cwd=self.workspace,
            env={**os.environ, "HOME": str(self.root / "home")},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    def run(self, target: str, *extra: str) -> tuple[int, str]:
        proc = self.build(target, *extra)
        return wait_bazel(proc)

    def outputs(self, names: Sequence[str]) -> dict[str, bytes]:
        return {name: (self.workspace / "bazel-bin" / name).read_bytes() for name in names}


def wait_bazel(proc: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a Bazel command; one that hangs is killed with its whole session."""
    try:
        output, _ = proc.communicate(timeout=BAZEL_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -1, f"(killed after {BAZEL_SECONDS}s)\n{output}"
    return proc.returncode, output
