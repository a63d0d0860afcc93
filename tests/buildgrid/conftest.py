"""BuildGrid fixtures: a private PostgreSQL and BuildGrid (or a skip, or a failure in CI), Bazel, bots."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _gridkit import CONTAINER_IMAGE, BotProcess, BuildGrid, Postgres, missing_requirements
from _support import build_busybox_image, docker_client_or_unavailable, required, unavailable


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuildGrid]:
    """BuildGrid over its own PostgreSQL, for one test module; both stop when it ends."""
    reason = missing_requirements()
    if reason is not None:
        unavailable(reason, flag="EXPBUILD_REQUIRE_BUILDGRID")
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
        # The id must be unique on the host (a worker id in use is refused), and a test's
        # tmp_path name is the same in another run of the same test at the same time.
        bot = BotProcess(
            root=tmp_path / "bots", bot_id=f"{bot_id}-{uuid.uuid4().hex[:12]}", target=grid.target, **kwargs
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
        unavailable(
            "no bazel on PATH (Debian: apt-get install bazel-bootstrap)",
            flag="EXPBUILD_REQUIRE_BUILDGRID",
            demanded=required("EXPBUILD_REQUIRE_BUILDGRID") or required("EXPBUILD_REQUIRE_BAZEL"),
        )
    return found


@pytest.fixture(scope="session")
def container_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The busybox image the container-platform action asks for, built locally (never pulled)."""
    client = docker_client_or_unavailable()
    try:
        yield build_busybox_image(client, tmp_path_factory.mktemp("grid-busybox-image"), CONTAINER_IMAGE)
    finally:
        client.close()
