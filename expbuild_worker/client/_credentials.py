"""How a client proves itself to a worker (or the bot to its scheduler): TLS, certificate, token."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from expbuild_worker.errors import ConfigError


@dataclass(frozen=True, slots=True, kw_only=True)
class ChannelSecurity:
    """What a channel presents. All empty: plaintext, no token (loopback use).

    ``ca_file`` turns TLS on and names the CA that signed the server's certificate;
    ``certificate_file``/``private_key_file`` are the client's certificate for mutual TLS;
    ``token_file`` holds a bearer token sent with every call; ``server_name`` overrides the
    name the server's certificate must carry (default: the target's host)."""

    ca_file: str = ""
    certificate_file: str = ""
    private_key_file: str = ""
    token_file: str = ""
    server_name: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.ca_file or self.certificate_file)


def open_channel(
    target: str, security: ChannelSecurity | None = None, *, options: Sequence[tuple[str, Any]] = ()
) -> grpc.Channel:
    """A blocking channel to ``target`` presenting ``security``; ConfigError names an unreadable file."""
    security = security or ChannelSecurity()
    options = list(options)
    if security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    if security.tls:
        channel = grpc.secure_channel(target, channel_credentials(security), options=options)
    else:
        channel = grpc.insecure_channel(target, options=options)
    token = read_token(security)
    if token:
        channel = grpc.intercept_channel(channel, _Token(token))
    return channel


def channel_credentials(security: ChannelSecurity) -> grpc.ChannelCredentials:
    """TLS credentials (for ``grpc.secure_channel`` or ``grpc.aio.secure_channel``)."""
    if bool(security.certificate_file) != bool(security.private_key_file):
        raise ConfigError("a client certificate needs its private key, and the key its certificate")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(security.ca_file, "CA") if security.ca_file else None,
        private_key=_read(security.private_key_file, "private key") if security.private_key_file else None,
        certificate_chain=_read(security.certificate_file, "certificate")
        if security.certificate_file
        else None,
    )


def read_token(security: ChannelSecurity) -> str:
    return _read(security.token_file, "token").decode().strip() if security.token_file else ""


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries ``token`` (for asyncio stubs: pass as ``metadata=``)."""
    return (("authorization", f"Bearer {token}"),)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise ConfigError(f"cannot read the {what} file {path}: {err.strerror}") from err


class _Token(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to every call (TLS or not: loopback use allowed)."""

    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _with_token(self, details: Any) -> Any:
        return _Details(
            method=details.method,
            timeout=details.timeout,
            metadata=(*(details.metadata or ()), *self._metadata),
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
            compression=details.compression,
        )

    def intercept_unary_unary(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        return continuation(self._with_token(details), requests)


@dataclass(frozen=True, slots=True)
class _Details(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: bool | None
    compression: Any
