"""Docker test fixtures: a real daemon (or a skip, or a failure in CI) and locally built busybox images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _support import build_busybox_image, docker_client_or_unavailable

BUSYBOX_IMAGE = "expbuild-test/busybox:1"
NONROOT_IMAGE = "expbuild-test/busybox-nonroot:1"
NONROOT_UID = 4242


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client of the daemon the tests use; skips (or fails in CI) when none answers."""
    client = docker_client_or_unavailable()
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
    return build_busybox_image(docker_client, tmp_path_factory.mktemp("busybox-image"), BUSYBOX_IMAGE)


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
