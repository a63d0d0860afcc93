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
from _support import build_busybox_image, docker_client_or_unavailable, unavailable

BUSYBOX_IMAGE = "expbuild-test/bazel-busybox:1"


@pytest.fixture(scope="session")
def bazel_binary() -> str:
    """The ``bazel`` on PATH; skips without one (fails when CI=true or EXPBUILD_REQUIRE_BAZEL=1)."""
    found = shutil.which("bazel")
    if found is None:
        unavailable(
            "no bazel on PATH (Debian: apt-get install bazel-bootstrap)", flag="EXPBUILD_REQUIRE_BAZEL"
        )
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


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client of the local engine; skips without one (fails when CI=true or EXPBUILD_REQUIRE_DOCKER=1)."""
    client = docker_client_or_unavailable()
    yield client
    client.close()


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A FROM-scratch image of the static busybox and its applet links, built here, never pulled.

    It has ``/bin/sh`` (busybox ash) but no bash, so builds that use it pass
    ``--shell_executable=/bin/sh`` (genrules run under ``/bin/bash -c`` by default).
    """
    return build_busybox_image(docker_client, tmp_path_factory.mktemp("bazel-busybox-image"), BUSYBOX_IMAGE)
