"""Configuration: parsed once, every mistake named with file, key and expectation."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from expbuild_worker.config import (
    DockerExecutorConfig,
    ExecutionConfig,
    HostExecutorConfig,
    MetricsConfig,
    ServerConfig,
    StorageConfig,
    load_config,
    parse_config,
)
from expbuild_worker.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs" / "worker").glob("*.toml")))
def test_shipped_example_configs_parse(name):
    """Every documented example must be a config the worker accepts."""
    config = load_config(ROOT / "configs" / "worker" / name)
    assert config.executors


def test_host_example_documents_every_option():
    """Each host and common option appears in the example, so operators can find it."""
    text = (ROOT / "configs" / "worker" / "expbuild-worker.toml").read_text()
    for cls in (ServerConfig, ExecutionConfig, StorageConfig, MetricsConfig, HostExecutorConfig):
        for f in fields(cls):
            spelled = f"\n{f.name} = " in text or f".{f.name}]" in text
            assert spelled, f"{cls.__name__}.{f.name} is not documented"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"serverr": {}}, "unknown key 'serverr'"),
        ({"server": {"prot": 1}}, "server: unknown key 'prot'"),
        ({"server": {"port": "80"}}, "server.port: expected an integer, got '80'"),
        ({"server": {"port": 70000}}, "server.port: expected 0-65535"),
        ({"server": {"log_level": "loud"}}, "server.log_level: expected one of"),
        (
            {"execution": {"max_concurrent_executions": 0}},
            "execution.max_concurrent_executions: expected a positive",
        ),
        ({"execution": {"default_executor": "gpu"}}, "execution.default_executor: expected one of ['host']"),
        ({"executor": {"x": {"type": "vm"}}}, "executor.x.type: expected one of"),
        ({"executor": {"d": {"type": "docker", "pull_policy": "sometimes"}}}, "executor.d.pull_policy"),
        (
            {"executor": {"d": {"type": "docker", "readonly_rootfs": "yes"}}},
            "executor.d.readonly_rootfs: expected true",
        ),
        (
            {"executor": {"h": {"type": "host", "default_limits": {"memory_bytes": -1}}}},
            "executor.h.default_limits.memory_bytes",
        ),
        (
            {"executor": {"d": {"type": "docker", "security_opts": "x"}}},
            "executor.d.security_opts: expected a list",
        ),
        (
            {
                "executor": {
                    "d": {
                        "type": "docker",
                        "default_limits": {"memory_bytes": 2 << 30},
                        "max_limits": {"memory_bytes": 256 << 20},
                    }
                }
            },
            "executor.d.default_limits.memory_bytes: expected at most max_limits.memory_bytes",
        ),
        ({"execution": {"work_root": "/" + "w" * 1000}}, "execution.work_root: expected at most 960 bytes"),
    ],
    ids=[
        "unknown-section",
        "unknown-key",
        "wrong-type",
        "port-range",
        "bad-enum",
        "zero-slots",
        "unknown-default-executor",
        "unknown-executor-type",
        "bad-pull-policy",
        "bool-as-string",
        "negative-limit",
        "list-as-string",
        "default-above-maximum",
        "work-root-too-long",
    ],
)
def test_bad_config_names_key_and_expectation(raw, message):
    """A bad value stops start-up with a message an operator can act on."""
    with pytest.raises(ConfigError) as info:
        parse_config(raw, source="w.toml")
    assert str(info.value).startswith("w.toml: ")
    assert message in str(info.value)


def test_executor_order_is_file_order_and_first_is_default():
    """The first executor table is the default unless one is named."""
    config = parse_config({"executor": {"docker": {"type": "docker"}, "host": {"type": "host"}}})
    assert list(config.executors) == ["docker", "host"] and config.default_executor == "docker"
    assert isinstance(config.executors["docker"], DockerExecutorConfig)


def test_always_pull_maps_onto_the_pull_policy():
    """The older always_pull switch still works and means pull_policy = always."""
    config = parse_config({"executor": {"d": {"type": "docker", "always_pull": True}}})
    assert config.executors["d"].effective_pull_policy == "always"


def test_missing_and_malformed_files_are_named(tmp_path):
    """A missing or broken file is reported with its name."""
    with pytest.raises(ConfigError, match=r"nope\.toml: file not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[server\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML"):
        load_config(bad)
