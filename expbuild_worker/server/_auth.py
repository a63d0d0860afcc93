"""Who may call: TLS (optionally mutual) with certificates reloaded on change, and bearer tokens."""

from __future__ import annotations

import hmac
import inspect
import ipaddress
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc

from expbuild_worker.config import ServerConfig
from expbuild_worker.engine import CALLER
from expbuild_worker.errors import ConfigError
from expbuild_worker.frontdoors._grpc import Handler, rewrap

_log = logging.getLogger(__name__)

OPEN_SERVICES = frozenset({"grpc.health.v1.Health"})
"""Readable without credentials: load balancers and orchestrators probe health anonymously."""
_BEARER = "bearer "


def read_tokens(server: ServerConfig, source: str) -> dict[str, bytes]:
    """Each configured token's value by name, read from its file (surrounding whitespace dropped)."""
    tokens: dict[str, bytes] = {}
    for i, token in enumerate(server.tokens):
        try:
            value = Path(token.file).read_bytes().strip()
        except OSError as err:
            raise ConfigError(
                f"{source}: server.tokens[{i}].file: cannot read {token.file}: {err.strerror}"
            ) from err
        if len(value) < 16:
            raise ConfigError(
                f"{source}: server.tokens[{i}].file: the token must have at least 16 characters"
            )
        tokens[token.name] = value
    return tokens


class TokenCheck(grpc.aio.ServerInterceptor):
    """Lets a call through only with ``authorization: Bearer <token>`` for a configured token,
    compared in constant time; anything else is UNAUTHENTICATED before the handler runs. The
    health service stays open. The token's name becomes the call's ``CALLER``."""

    def __init__(self, tokens: Mapping[str, bytes]) -> None:
        self._tokens = dict(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.split("/")[1] in OPEN_SERVICES:
            return handler
        presented = ""
        for key, value in details.invocation_metadata or ():
            if key == "authorization" and isinstance(value, str):
                presented = value
        name = self._match(presented)
        if name is None:
            return rewrap(handler, _deny)
        return rewrap(handler, _as_caller(name))

    def _match(self, presented: str) -> str | None:
        if not presented.lower().startswith(_BEARER):
            return None
        offered = presented[len(_BEARER) :].strip().encode()
        found = None
        for name, token in self._tokens.items():  # every token compared: no early exit to time
            if hmac.compare_digest(offered, token):
                found = name
        return found


def _deny(behaviour: Any) -> Any:
    async def denied(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(
            grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token (authorization)"
        )

    return denied


def _as_caller(name: str) -> Callable[[Any], Any]:
    """Wrap a handler's behaviour so the call runs as the token's ``name`` (a coroutine, or an
    async generator for a handler that yields its responses)."""

    def wrap(behaviour: Any) -> Any:
        if inspect.isasyncgenfunction(behaviour):

            async def as_caller_yielding(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncIterator[Any]:
                CALLER.set(name)
                async for response in behaviour(request, context):
                    yield response

            return as_caller_yielding

        async def as_caller(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            CALLER.set(name)
            return await behaviour(request, context)

        return as_caller

    return wrap


def server_credentials(server: ServerConfig, source: str) -> grpc.ServerCredentials:
    """TLS credentials that pick up a renewed certificate, key or client CA: the files are
    checked for a change at every new connection (a certificate manager replaces them in
    place; no restart and no signal needed). With a client CA, clients must present a
    certificate it signed (mutual TLS)."""
    files = [
        f for f in (server.tls_certificate_file, server.tls_private_key_file, server.tls_client_ca_file) if f
    ]

    def stamps() -> tuple[float, ...]:
        return tuple(os.stat(f).st_mtime for f in files)

    def load() -> Any:
        key = Path(server.tls_private_key_file).read_bytes()
        chain = Path(server.tls_certificate_file).read_bytes()
        ca = Path(server.tls_client_ca_file).read_bytes() if server.tls_client_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    try:
        initial = load()
        seen = [stamps()]
    except OSError as err:
        raise ConfigError(f"{source}: server.tls_*_file: cannot read {err.filename}: {err.strerror}") from err

    def fetch() -> Any:
        try:
            now = stamps()
            if now == seen[0]:
                return None
            renewed = load()
        except OSError as err:
            _log.warning("TLS files could not be reloaded (%s); keeping the previous ones", err)
            return None
        seen[0] = now
        _log.info("TLS certificate reloaded from %s", server.tls_certificate_file)
        return renewed

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=bool(server.tls_client_ca_file)
    )


def is_loopback(address: str) -> bool:
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def check_listen_address(server: ServerConfig, source: str) -> None:
    """A worker runs arbitrary commands for whoever reaches it: it listens beyond loopback only
    with TLS or tokens, or when ``allow_insecure_remote`` says the network is trusted."""
    if is_loopback(server.address) or server.tls or server.tokens or server.allow_insecure_remote:
        return
    raise ConfigError(
        f"{source}: server.address: {server.address!r} is reachable from other machines, and anyone who "
        "reaches the worker can run commands on it; configure server.tls_certificate_file and "
        "server.tls_private_key_file (and server.tls_client_ca_file) or [[server.tokens]], or set "
        "server.allow_insecure_remote = true on a network you trust"
    )


def describe(server: ServerConfig) -> Sequence[str]:
    """What protects the port, for the start-up log line."""
    parts = []
    if server.tls:
        parts.append("mutual TLS" if server.tls_client_ca_file else "TLS")
    if server.tokens:
        parts.append(f"{len(server.tokens)} bearer token(s)")
    return parts or ["no authentication"]
