"""Who may call: TLS, mutual TLS, bearer tokens, an open health service, and no plaintext beyond loopback."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
from _pki import TOKEN, Pki, make_pki
from _support import execute, request
from grpc_health.v1 import health_pb2, health_pb2_grpc

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1 import worker_pb2_grpc as pb_grpc
from expbuild_worker.client import ChannelSecurity, WorkerClient, open_channel
from expbuild_worker.config import parse_config
from expbuild_worker.errors import ConfigError
from expbuild_worker.server._auth import check_listen_address


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki", "test")


def _health(channel: grpc.Channel) -> int:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status


def test_tls_only_serves_tls_clients_and_refuses_plaintext(start_worker, pki):
    """With a certificate the port speaks TLS only; a client that trusts the CA runs actions."""
    worker = start_worker(
        {
            "server": {
                "tls_certificate_file": str(pki.server_cert),
                "tls_private_key_file": str(pki.server_key),
            }
        }
    )
    with WorkerClient(worker.target, security=ChannelSecurity(ca_file=str(pki.ca))) as client:
        assert client.get_capabilities().worker_id
        run = execute(client.stub, request(["/bin/sh", "-c", "echo over tls"]))
        assert bytes(run.stdout) == b"over tls\n"
    with grpc.insecure_channel(worker.target) as plain, pytest.raises(grpc.RpcError) as info:
        pb_grpc.WorkerServiceStub(plain).GetCapabilities(pb.GetCapabilitiesRequest(), timeout=5)
    assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_its_own_clients_and_refuses_a_certificate_from_another_ca(
    start_worker, pki, tmp_path
):
    """With a client CA, only clients holding a certificate it signed get in."""
    worker = start_worker(
        {
            "server": {
                "tls_certificate_file": str(pki.server_cert),
                "tls_private_key_file": str(pki.server_key),
                "tls_client_ca_file": str(pki.ca),
            }
        }
    )
    good = ChannelSecurity(
        ca_file=str(pki.ca), certificate_file=str(pki.client_cert), private_key_file=str(pki.client_key)
    )
    with WorkerClient(worker.target, security=good) as client:
        assert client.get_capabilities().worker_id
    other = make_pki(tmp_path / "other", "other")
    wrong = ChannelSecurity(
        ca_file=str(pki.ca), certificate_file=str(other.client_cert), private_key_file=str(other.client_key)
    )
    for security in (wrong, ChannelSecurity(ca_file=str(pki.ca))):  # a stranger's certificate, or none
        with (
            WorkerClient(worker.target, security=security, rpc_timeout=5) as client,
            pytest.raises(grpc.RpcError) as info,
        ):
            client.get_capabilities()
        assert info.value.code() is grpc.StatusCode.UNAVAILABLE


def test_a_renewed_certificate_is_picked_up_without_a_restart(start_worker, pki, tmp_path):
    """Certificate managers replace files in place: the next connection sees the new chain."""
    worker = start_worker(
        {
            "server": {
                "tls_certificate_file": str(pki.server_cert),
                "tls_private_key_file": str(pki.server_key),
            }
        }
    )
    renewed = make_pki(tmp_path / "renewed", "renewed")
    time.sleep(0.01)
    os.replace(renewed.server_cert, pki.server_cert)
    os.replace(renewed.server_key, pki.server_key)
    with WorkerClient(worker.target, security=ChannelSecurity(ca_file=str(renewed.ca))) as client:
        assert client.get_capabilities().worker_id


@pytest.fixture
def token_worker(start_worker, tmp_path: Path):
    token_file = tmp_path / "ci.token"
    token_file.write_text(TOKEN + "\n")
    return start_worker({"server": {"tokens": [{"name": "ci", "file": str(token_file)}]}}), token_file


def test_a_valid_token_is_accepted_and_named_in_the_action_log(token_worker, caplog):
    """The token's name is who ran the action, in the worker's action log."""
    worker, token_file = token_worker
    caplog.set_level("INFO", logger="expbuild_worker.actions")
    with WorkerClient(worker.target, security=ChannelSecurity(token_file=str(token_file))) as client:
        run = execute(client.stub, request(["/bin/true"], execution_id="by-token"))
    assert run.status == pb.EXECUTION_STATUS_COMPLETED
    line = next(r.getMessage() for r in caplog.records if "by-token" in r.getMessage())
    assert "caller=ci" in line


@pytest.mark.parametrize(
    "token", [None, "wrong-token-wrong-token-wrong", ""], ids=["missing", "wrong", "empty"]
)
def test_a_missing_or_wrong_token_is_unauthenticated(token_worker, tmp_path, token):
    """Without the right token nothing runs: UNAUTHENTICATED before the handler."""
    worker, _ = token_worker
    security = ChannelSecurity()
    if token is not None:
        path = tmp_path / "presented.token"
        path.write_text(token)
        security = ChannelSecurity(token_file=str(path))
    with (
        WorkerClient(worker.target, security=security, rpc_timeout=5) as client,
        pytest.raises(grpc.RpcError) as info,
    ):
        list(client.stub.Execute(request(["/bin/true"]), timeout=5))
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_health_is_readable_without_credentials(token_worker):
    """Load balancers probe health anonymously; everything else needs the token."""
    worker, _ = token_worker
    with open_channel(worker.target) as channel:
        assert _health(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_beyond_loopback_is_refused_at_start(start_worker):
    """Plaintext on 0.0.0.0 would let anyone run commands: refused at start, naming the keys."""
    with pytest.raises(ConfigError, match=r"server\.address: '0\.0\.0\.0'.*allow_insecure_remote"):
        start_worker({"server": {"address": "0.0.0.0"}})


@pytest.mark.parametrize(
    "server",
    [
        {"address": "127.0.0.1"},
        {"address": "::1"},
        {"address": "localhost"},
        {"address": "0.0.0.0", "allow_insecure_remote": True},
        {"address": "0.0.0.0", "tokens": [{"name": "a", "file": "/t"}]},
        {"address": "0.0.0.0", "tls_certificate_file": "/c", "tls_private_key_file": "/k"},
    ],
    ids=["v4-loopback", "v6-loopback", "localhost", "insecure-said", "tokens", "tls"],
)
def test_remote_addresses_are_allowed_with_protection_or_when_said(server):
    """Remote listening is allowed with TLS or tokens, or allow_insecure_remote (checked, not bound)."""
    config = parse_config({"server": server})
    check_listen_address(config.server, config.source)


def test_a_token_caller_is_set_for_handlers_that_yield_their_responses() -> None:
    """The token check wraps a handler written as an async generator as well as a coroutine:
    every response comes through and the call runs as the token's name."""
    import asyncio

    from expbuild_worker.engine import CALLER
    from expbuild_worker.server._auth import _as_caller

    async def streaming(request: int, context: object):  # type: ignore[no-untyped-def]
        for i in range(request):
            yield (i, CALLER.get())

    async def unary(request: int, context: object) -> tuple[int, str]:
        return request, CALLER.get()

    async def scenario() -> tuple[list[object], object]:
        wrapped_stream = _as_caller("ci")(streaming)
        wrapped_unary = _as_caller("ci")(unary)
        return [r async for r in wrapped_stream(3, None)], await wrapped_unary(7, None)

    streamed, single = asyncio.run(scenario())
    assert streamed == [(0, "ci"), (1, "ci"), (2, "ci")]
    assert single == (7, "ci")
