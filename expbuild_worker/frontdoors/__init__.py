"""The ways into the worker, one package each: translate wire messages, delegate, word errors."""

from __future__ import annotations

from typing import Protocol

import grpc


class FrontDoor(Protocol):
    """One way in, as the server hosts it: the gRPC services it registers, nothing else.

    Front doors are built by the composition root over the one engine and store; none imports
    another. ``service_names`` are the full gRPC service names (for health and reflection).
    """

    name: str
    service_names: tuple[str, ...]
    executing_service_names: tuple[str, ...]
    """The services that run actions: healthy only while the worker can run one."""

    def register(self, server: grpc.aio.Server) -> None: ...

    async def close(self) -> None:
        """Release what the front door holds of its own (after the server stopped serving)."""
        ...


__all__ = ["FrontDoor"]
