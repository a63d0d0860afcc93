"""Docker test fixtures: a real daemon (or a skip, or a failure in CI) and locally built busybox images."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

BUSYBOX_IMAGE = "expbuild-test/busybox:1"
NONROOT_IMAGE = "expbuild-test/busybox-nonroot:1"
NONROOT_UID = 4242

_REQUIRED = os.environ.get("CI") == "true" or os.environ.get("EXPBUILD_REQUIRE_DOCKER") == "1"


def _unavailable(reason: str) -> None:
    """Skip where Docker is optional; fail where CI=true or EXPBUILD_REQUIRE_DOCKER=1 demands it."""
    if _REQUIRED:
        pytest.fail(f"a Docker engine is required here (CI=true or EXPBUILD_REQUIRE_DOCKER=1): {reason}")
    pytest.skip(reason)


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
    """A client of the daemon the tests use; skips (or fails in CI) when none answers."""
    try:
        import docker

        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as err:
        _unavailable(f"no Docker engine answers: {err}")
    yield client
    client.close()


def _build(client: Any, context: Path, dockerfile: str, tag: str) -> None:
    (context / "Dockerfile").write_text(dockerfile)
    client.images.build(
        path=str(context), tag=tag, rm=True, forcerm=True, pull=False, labels={"io.expbuild.project": "tests"}
    )


@pytest.fixture(scope="session")
def busybox_image(docker_client: Any, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A FROM-scratch image holding only the static busybox and its applet links (root by default)."""
    busybox = _static_busybox()
    if busybox is None:
        _unavailable("no static busybox (install busybox-static) to build the test image from")
        raise AssertionError("unreachable")
    context = tmp_path_factory.mktemp("busybox-image")
    shutil.copy2(busybox, context / "busybox")
    _build(
        docker_client,
        context,
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n',
        BUSYBOX_IMAGE,
    )
    return BUSYBOX_IMAGE


@pytest.fixture(scope="session")
def nonroot_image(docker_client: Any, busybox_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The busybox image with a named non-root default user, ``builder`` (uid 4242)."""
    context = tmp_path_factory.mktemp("nonroot-image")
    (context / "passwd").write_text(
        f"root:x:0:0::/root:/bin/sh\nbuilder:x:{NONROOT_UID}:{NONROOT_UID}::/tmp:/bin/sh\n"
    )
    (context / "group").write_text(f"root:x:0:\nbuilder:x:{NONROOT_UID}:\n")
    _build(
        docker_client,
        context,
        f"FROM {busybox_image}\nCOPY passwd group /etc/\nUSER builder\n",
        NONROOT_IMAGE,
    )
    return NONROOT_IMAGE
