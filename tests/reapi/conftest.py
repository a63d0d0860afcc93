"""Fixtures: the REAPI storage services on 127.0.0.1 port 0 over a real store in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _reapi_support import ReapiServer


@pytest.fixture
def start_reapi(tmp_path: Path) -> Iterator[Callable[..., ReapiServer]]:
    """Factory: start the services over a fresh store in ``tmp_path`` (options as the builder's)."""
    started: list[ReapiServer] = []

    def factory(*, store_bytes: int = 64 << 20, instance_name: str = "", **options: Any) -> ReapiServer:
        root = tmp_path / f"server{len(started)}"
        server = ReapiServer(root, store_bytes=store_bytes, instance_name=instance_name, **options)
        started.append(server)
        return server

    yield factory
    for server in started:
        server.stop()


@pytest.fixture
def reapi(start_reapi: Callable[..., ReapiServer]) -> ReapiServer:
    """The services for instance "" over a 64 MiB store."""
    return start_reapi()
