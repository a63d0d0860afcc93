"""Bazel test fixtures: a real Bazel client (or a skip, or a failure in CI) and its hermetic runs."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

WORKSPACE = Path(__file__).parent / "workspace"
BUSYBOX_IMAGE = "expbuild-test/bazel-busybox:1"
BAZEL_SECONDS = 300
"""Longest one Bazel command may take before it is killed (with its JVM) and the test fails."""

_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_BAZEL") == "1"
_DOCKER_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str, *, required: bool, flag: str) -> None:
    """Skip where the tool is optional; fail where CI=true or the ``flag`` variable demands it."""
    if required:
        pytest.fail(f"required here (CI=true or {flag}=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bazel_binary() -> str:
    """The ``bazel`` on PATH; skips (or fails in CI) without one."""
    found = shutil.which("bazel")
    if found is None:
        _unavailable(
            "no bazel on PATH (Debian: apt-get install bazel-bootstrap)",
            required=_REQUIRED,
            flag="EXPBUILD_REQUIRE_BAZEL",
        )
        raise AssertionError("unreachable")
    return found


@dataclass
class BazelRun:
    """What one Bazel command printed and how it ended."""

    argv: list[str]
    returncode: int
    output: str

    def processes(self) -> dict[str, int]:
        """Bazel's summary of the spawns it ran, e.g. ``{"remote cache hit": 7, "internal": 1}``.

        Read from the line ``INFO: 8 processes: 7 remote cache hit, 1 internal.``
        """
        match = re.search(r"INFO: \d+ process(?:es)?: (.*?)\.?$", self.output, re.MULTILINE)
        if match is None:
            return {}
        counts: dict[str, int] = {}
        for part in match.group(1).split(", "):
            number, _, kind = part.partition(" ")
            counts[kind] = int(number)
        return counts


@dataclass
class Bazel:
    """A copy of the test workspace and a Bazel whose every cache lives in ``root``.

    Commands run with ``--batch`` (no server outlives a command) and without any rc file but
    the workspace's; the output user root (install base, output base, repository cache) and
    HOME are under ``root``, and no disk cache is used, so nothing is shared with another run.
    """

    binary: str
    root: Path
    workspace: Path = field(init=False)
    _env: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.workspace = self.root / "workspace"
        shutil.copytree(WORKSPACE, self.workspace)
        home = self.root / "home"
        home.mkdir()
        self._env = {**os.environ, "HOME": str(home)}

    @property
    def output_user_root(self) -> Path:
        return self.root / "output_user_root"

    def __call__(self, command: str, *flags: str, check: bool = True) -> BazelRun:
        argv = [
            self.binary,
            f"--output_user_root={self.output_user_root}",
            "--batch",
            "--nosystem_rc",
            "--nohome_rc",
            command,
            *flags,
        ]
        # Its own session, so that a command that hangs is killed with every process it started.
        proc = subprocess.Popen(
            argv,
            cwd=self.workspace,
            env=self._env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            output, _ = proc.communicate(timeout=BAZEL_SECONDS)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            pytest.fail(f"bazel {command} took more than {BAZEL_SECONDS} s:\n{output[-4000:]}")
        run = BazelRun(argv=argv, returncode=proc.returncode, output=output)
        if check and run.returncode != 0:
            pytest.fail(f"bazel {command} failed (exit {run.returncode}):\n{output[-6000:]}")
        return run

    def output(self, path: str) -> bytes:
        """The bytes of ``bazel-bin/<path>`` as the last build left them."""
        return (self.workspace / "bazel-bin" / path).read_bytes()

    def survivors(self) -> list[int]:
        """Pids of processes still running with this Bazel's output user root on their command line."""
        marker = str(self.output_user_root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
        return found


@pytest.fixture
def bazel(bazel_binary: str, tmp_path: Path) -> Iterator[Bazel]:
    """A hermetic Bazel over a fresh copy of the genrule workspace; no Bazel process outlives the test."""
    runner = Bazel(binary=bazel_binary, root=tmp_path / "bazel")
    yield runner
    survivors = runner.survivors()
    for pid in survivors:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not survivors, f"Bazel processes outlived the test (killed): {survivors}"


def _static_busybox() -> Path | None:
    """The static busybox (Debian's busybox-static) a FROM-scratch image can run, if installed."""
    for candidate in ("/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate):
            head = Path(candidate).read_bytes()[:4096]
            if head.startswith(b"\x7fELF") and b"ld-linux" not in head and b"ld-musl" not in head:
                return Path(candidate)
    return None


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client of the local engine; skips (or fails in CI) when none answers."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as err:
        _unavailable(
            f"no Docker engine answers: {err}", required=_DOCKER_REQUIRED, flag="EXPBUILD_REQUIRE_DOCKER"
        )
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A FROM-scratch image of the static busybox and its applet links, built here, never pulled.

    It has ``/bin/sh`` (busybox ash) but no bash: builds that use it pass
    ``--shell_executable=/bin/sh``.
    """
    busybox = _static_busybox()
    if busybox is None:
        _unavailable(
            "no static busybox (install busybox-static) to build the test image from",
            required=_DOCKER_REQUIRED,
            flag="EXPBUILD_REQUIRE_DOCKER",
        )
        raise AssertionError("unreachable")
    context = tmp_path_factory.mktemp("bazel-busybox-image")
    shutil.copy2(busybox, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    docker_client.images.build(
        path=str(context),
        tag=BUSYBOX_IMAGE,
        rm=True,
        forcerm=True,
        pull=False,
        labels={"io.expbuild.project": "tests"},
    )
    return BUSYBOX_IMAGE
