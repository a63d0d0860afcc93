"""Bazel test fixtures: a real Bazel (or a skip, or a failure in CI) and locally built busybox images."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _bazelkit import Bazel

BUSYBOX_IMAGE = "expbuild-test/bazel-busybox:1"

_BAZEL_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_BAZEL") == "1"
_DOCKER_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str, *, required: bool, flag: str) -> None:
    """Skip where the tool is optional; fail where CI=true or ``flag``=1 demands it."""
    if required:
        pytest.fail(f"required here (CI=true or {flag}=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def bazel_binary() -> str:
    """The ``bazel`` on PATH; skips without one (fails when CI=true or EXPBUILD_REQUIRE_BAZEL=1)."""
    found = shutil.which("bazel")
    if found is None:
        _unavailable(
            "no bazel on PATH (Debian: apt-get install bazel-bootstrap)",
            required=_BAZEL_REQUIRED,
            flag="EXPBUILD_REQUIRE_BAZEL",
        )
        raise AssertionError("unreachable")
    return found


@pytest.fixture
def bazel(bazel_binary: str, tmp_path: Path) -> Iterator[Bazel]:
    """A hermetic Bazel over a fresh copy of the genrule workspace; no Bazel process outlives the test."""
    runner = Bazel(binary=bazel_binary, root=tmp_path / "bazel")
    yield runner
    survivors = runner.survivors()
    for pid in survivors:  # only processes carrying this test's own output user root
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"Bazel processes outlived the test (now killed): {survivors}"


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
    """A client of the local engine; skips without one (fails when CI=true or EXPBUILD_REQUIRE_DOCKER=1)."""
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

    It has ``/bin/sh`` (busybox ash) but no bash, so builds that use it pass
    ``--shell_executable=/bin/sh`` (genrules run under ``/bin/bash -c`` by default).
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
