"""BuildGrid fixtures: a private PostgreSQL and BuildGrid (or a skip, or a failure in CI), Bazel, bots."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _gridkit import CONTAINER_IMAGE, BotProcess, BuildGrid, Postgres, missing_requirements

_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_BUILDGRID") == "1"
_DOCKER_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str, *, required: bool, flag: str) -> None:
    """Skip where the tool is optional; fail where CI=true or ``flag``=1 demands it."""
    if required:
        pytest.fail(f"required here (CI=true or {flag}=1): {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildGrid]:
    """BuildGrid over its own PostgreSQL, for one test module; both stop when it ends."""
    reason = missing_requirements()
    if reason is not None:
        _unavailable(reason, required=_REQUIRED, flag="EXPBUILD_REQUIRE_BUILDGRID")
    root = tmp_path_factory.mktemp("buildgrid")
    # PostgreSQL runs as another user, who must reach its data directory by its full path.
    top = tmp_path_factory.getbasetemp().parent
    for directory in [root, *root.parents]:
        directory.chmod(directory.stat().st_mode | 0o011)
        if directory == top:
            break
    db = Postgres(root / "postgres")
    db.start()
    server = BuildGrid(root / "server", db)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        db.stop()


@pytest.fixture
def bots(grid: BuildGrid, tmp_path: Path) -> Iterator[Callable[..., BotProcess]]:
    """Start bots against ``grid``; every one still running at the end is stopped (SIGTERM, then SIGKILL)."""
    started: list[BotProcess] = []

    def start(bot_id: str, **kwargs: Any) -> BotProcess:
        bot = BotProcess(
            root=tmp_path / "bots", bot_id=f"{bot_id}-{tmp_path.name}", target=grid.target, **kwargs
        )
        bot.start()
        started.append(bot)
        return bot

    yield start
    for bot in started:
        bot.stop()


@pytest.fixture(scope="session")
def bazel_binary() -> str:
    found = shutil.which("bazel")
    if found is None:
        _unavailable(
            "no bazel on PATH (Debian: apt-get install bazel-bootstrap)",
            required=_REQUIRED or os.environ.get("EXPBUILD_REQUIRE_BAZEL") == "1",
            flag="EXPBUILD_REQUIRE_BUILDGRID",
        )
        raise AssertionError("unreachable")
    return found


def _static_busybox() -> Path | None:
    for candidate in ("/bin/busybox", shutil.which("busybox")):
        if candidate and os.path.isfile(candidate):
            head = Path(candidate).read_bytes()[:4096]
            if head.startswith(b"\x7fELF") and b"ld-linux" not in head and b"ld-musl" not in head:
                return Path(candidate)
    return None


@pytest.fixture(scope="session")
def container_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The busybox image the container-platform action asks for, built locally (never pulled)."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as err:
        _unavailable(
            f"no Docker engine answers: {err}", required=_DOCKER_REQUIRED, flag="EXPBUILD_REQUIRE_DOCKER"
        )
    busybox = _static_busybox()
    if busybox is None:
        _unavailable(
            "no static busybox (busybox-static)", required=_DOCKER_REQUIRED, flag="EXPBUILD_REQUIRE_DOCKER"
        )
        raise AssertionError("unreachable")
    context = tmp_path_factory.mktemp("grid-busybox-image")
    shutil.copy2(busybox, context / "busybox")
    (context / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    )
    client.images.build(
        path=str(context), tag=CONTAINER_IMAGE, rm=True, forcerm=True, pull=False,
        labels={"io.expbuild.project": "tests"},
    )  # fmt: skip
    yield CONTAINER_IMAGE
    with contextlib.suppress(Exception):
        client.close()
