"""The Docker example config parses and documents every Docker executor option."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from expbuild_worker.config import DockerExecutorConfig, load_config
from expbuild_worker.model import ResourceLimits

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "worker" / "expbuild-worker-docker.toml"


def test_docker_example_parses_into_a_docker_executor() -> None:
    """The example an operator copies starts a worker whose default executor is Docker."""
    config = load_config(EXAMPLE)
    executor = config.executors[config.default_executor]
    assert isinstance(executor, DockerExecutorConfig)
    assert executor.image and executor.network_mode == "none" and executor.readonly_rootfs


def test_docker_example_documents_every_option() -> None:
    """Each DockerExecutorConfig field appears in the example, so no option is undocumented."""
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    keys |= set(re.findall(r"^\[executor\.docker\.([a-z_]+)\]", text, flags=re.MULTILINE))
    missing = {f.name for f in dataclasses.fields(DockerExecutorConfig)} - keys
    assert not missing, f"undocumented options: {sorted(missing)}"


def test_limits_tables_become_executor_limits_disk_included() -> None:
    """Every limit in a limits table reaches the executor, disk_bytes too, and 0 means no limit."""
    executor = load_config(EXAMPLE).executors["docker"]
    assert executor.default_limits.to_limits() == ResourceLimits(
        cpu_cores=1.0, memory_bytes=2 << 30, max_processes=1024, disk_bytes=10 << 30
    )
    assert executor.max_limits.to_limits() == ResourceLimits()
