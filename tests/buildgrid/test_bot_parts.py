"""The bot's parts that need no scheduler: its [bot] checks, lease payloads, the properties it offers."""

from __future__ import annotations

import re

import pytest
from google.protobuf import any_pb2

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.composition import check_bot_config
from expbuild_worker.config import parse_config
from expbuild_worker.errors import ConfigError, InvalidRequestError
from expbuild_worker.frontdoors.bot import offered_properties, payload_digest, worker_message
from expbuild_worker.model import (
    Digest,
    ExecutorCapabilities,
    IsolationLevel,
    Readiness,
    ResourceLimits,
)


@pytest.mark.parametrize(
    ("bot", "message"),
    [
        ({}, "bot.scheduler: expected the scheduler's address"),
        ({"scheduler": "grpcs://grid:443"}, "bot.scheduler: 'grpcs://grid:443': only grpc://HOST:PORT"),
        ({"scheduler": "grpc://grid"}, "bot.scheduler: expected grpc://HOST:PORT"),
        ({"scheduler": "grpc://grid:1", "cas": "grpc://cas:0"}, "bot.cas: expected grpc://HOST:PORT"),
        (
            {"scheduler": "grpc://grid:1", "tls_ca_file": "/nonexistent/ca.pem"},
            "bot.tls_ca_file: cannot read",
        ),
        (
            {"scheduler": "grpc://grid:1", "tls_client_cert_file": "/nonexistent/c.pem"},
            "bot.tls_client_cert_file, bot.tls_client_key_file: give both or neither",
        ),
        ({"scheduler": "grpc://grid:1", "capacity": -1}, "bot.capacity: expected a positive number"),
        (
            {"scheduler": "grpc://grid:1", "poll_timeout_seconds": 2},
            "bot.poll_timeout_seconds: expected at least 5",
        ),
    ],
    ids=[
        "no-scheduler",
        "tls-scheme",
        "no-port",
        "bad-cas",
        "tls-file",
        "half-mtls",
        "capacity",
        "short-poll",
    ],
)
def test_a_bot_table_the_bot_cannot_use_is_refused_naming_the_key(bot, message):
    """A bot that would fail later (or silently talk in the clear when TLS was asked) must not start."""
    config = parse_config({"bot": bot}, source="bot.toml")
    with pytest.raises(ConfigError, match="^" + re.escape(f"bot.toml: {message}")):
        check_bot_config(config)


def test_a_usable_bot_table_passes():
    """The documented shape (grpc://HOST:PORT, an instance, a capacity) is accepted as it is."""
    check_bot_config(parse_config({"bot": {"scheduler": "grpc://grid.example:50051", "capacity": 2}}))


def test_a_lease_carries_the_action_itself_or_its_digest():
    """BuildGrid sends either form; both must name the same action."""
    action = re_pb.Action(command_digest=re_pb.Digest(hash="a" * 64, size_bytes=3))
    packed = any_pb2.Any()
    packed.Pack(action)
    digest, data = payload_digest(packed)
    assert data == action.SerializeToString()
    assert digest == Digest.of_bytes(data)
    by_digest = any_pb2.Any()
    by_digest.Pack(re_pb.Digest(hash=digest.sha256, size_bytes=digest.size))
    assert payload_digest(by_digest) == (digest, None)


def test_a_lease_of_anything_else_is_refused_by_name():
    """A payload the bot cannot read is the scheduler's mistake, said as such, never run."""
    other = any_pb2.Any()
    other.Pack(re_pb.Command(arguments=["true"]))
    with pytest.raises(InvalidRequestError, match=r"lease\.payload: expected"):
        payload_digest(other)


def _caps(name: str, isolation: IsolationLevel, ready: bool = True) -> ExecutorCapabilities:
    return ExecutorCapabilities(
        name=name,
        isolation=isolation,
        readiness=Readiness(ready),
        enforced_limits=frozenset(),
        unenforced_limits=frozenset(),
        default_limits=ResourceLimits(),
        max_limits=ResourceLimits(),
    )


def test_offered_properties_list_every_value_an_action_may_ask_for():
    """Schedulers match by subsets, so a weaker isolation and each image must be offered explicitly."""
    pairs = offered_properties(
        [_caps("host", IsolationLevel.HOST), _caps("docker", IsolationLevel.CONTAINER)], ["busybox:1"]
    )
    assert ("isolation", "host") in pairs and ("isolation", "container") in pairs
    assert ("isolation", "virtualized") not in pairs
    assert ("executor", "docker") in pairs and ("container-image", "docker://busybox:1") in pairs
    assert {key for key, _ in pairs} >= {"OSFamily", "ISA"}


def test_images_are_not_offered_without_a_ready_container_executor():
    """Offering an image the worker cannot run would attract actions it can only fail."""
    pairs = offered_properties(
        [_caps("host", IsolationLevel.HOST), _caps("docker", IsolationLevel.CONTAINER, ready=False)],
        ["busybox:1"],
    )
    assert not [pair for pair in pairs if pair[0] == "container-image"]
    assert ("executor", "docker") not in pairs


def test_the_worker_message_carries_capacity_where_buildgrid_reads_it():
    """BuildGrid reads the capacity from Worker.configs and properties from the first device."""
    worker = worker_message("bot-1", [("OSFamily", "linux")], 3)
    assert [(c.key, c.value) for c in worker.configs] == [("capacity", "3")]
    assert worker.devices[0].handle == "bot-1"
    assert [(p.key, p.value) for p in worker.devices[0].properties] == [("OSFamily", "linux")]
