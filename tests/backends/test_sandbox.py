"""What only the bubblewrap sandbox does: its view of the file system, argv[0] looked up there,
network on request, its configuration, and its place between host and container."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import SANDBOX_USER, unavailable

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))

from _dockerkit import Ran, run_command

from expbuild_worker.config import SandboxExecutorConfig, load_config
from expbuild_worker.errors import ConfigError, PreconditionError
from expbuild_worker.execution.sandbox import SandboxExecutor
from expbuild_worker.execution.sandbox._view import SandboxView
from expbuild_worker.model import ExecutionStatus, ResourceLimits

ENV = {"PATH": "/usr/bin:/bin"}
EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "worker" / "expbuild-worker-sandbox.toml"


def sandbox(**settings: Any) -> SandboxExecutor:
    return SandboxExecutor(
        kill_grace_seconds=0.5,
        refuse_unenforceable_limits=True,
        default_limits=ResourceLimits(),
        max_limits=ResourceLimits(),
        worker_id=f"test-sandbox-{os.getpid()}",
        run_as=SANDBOX_USER,
        **settings,
    )


NO_LIMITS = ResourceLimits()


def run(argv: list[str], root: Path, *, limits: ResourceLimits = NO_LIMITS, **settings: Any) -> Ran:
    async def main() -> Ran:
        ex = sandbox(**settings)
        await ex.start()
        try:
            ready = await ex.readiness()
            if not ready.ready:
                unavailable(ready.message)
            return await run_command(ex, root, argv, env=ENV, limits=limits)
        finally:
            await ex.close()

    return asyncio.run(main())


def test_argv0_is_looked_up_in_the_sandbox_not_on_the_host(tmp_path: Path) -> None:
    """A program the host has but the sandbox does not see cannot start: the view is what runs."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    tool = hidden / "tool"
    tool.write_text("#!/bin/sh\necho ran\n")
    tool.chmod(0o755)
    root = tmp_path / "root"
    root.mkdir()

    async def main() -> Ran:
        ex = sandbox()
        await ex.start()
        try:
            if not (await ex.readiness()).ready:
                unavailable("bubblewrap cannot make a sandbox here")
            return await run_command(ex, root, ["tool"], env={"PATH": str(hidden)}, limits=NO_LIMITS)
        finally:
            await ex.close()

    ran = asyncio.run(main())
    assert ran.status is ExecutionStatus.FAILED_TO_START
    assert "not found in the sandbox" in ran.outcome.message


def test_argv0_follows_links_inside_the_view() -> None:
    """/bin/sh through a /bin -> usr/bin link is the sandbox's /usr/bin/sh, as the kernel would find it."""
    view = SandboxView(binds={"/usr": "/usr"}, links={"/bin": "usr/bin"})
    found = view.find_executable("sh", {"PATH": "/bin"}, "/work")
    assert found.startswith("/usr/bin/")


@pytest.mark.skipif(SANDBOX_USER is None, reason="commands run as the worker's own user, who owns the inputs")
def test_inputs_cannot_be_rewritten_in_place(tmp_path: Path) -> None:
    """Staged inputs are the worker's: the command reads them and cannot change what others see."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "input.txt").write_text("original\n")
    ran = run(["sh", "-c", "cat input.txt; echo tampered >> input.txt || echo refused"], root)
    assert ran.status is ExecutionStatus.COMPLETED
    assert b"original" in ran.stdout
    assert (root / "input.txt").read_text() == "original\n"


def test_network_is_refused_unless_allowed_and_then_is_the_hosts(tmp_path: Path) -> None:
    """Asking for network where none is allowed is refused up front; where allowed, the host's is shared."""
    ex = sandbox()
    with pytest.raises(PreconditionError, match=r"limits\.network=NETWORK_ACCESS_ENABLED"):
        ex.check(ResourceLimits(network=True), None)
    root = tmp_path / "root"
    root.mkdir()
    ran = run(
        ["sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"],
        root,
        limits=ResourceLimits(network=True),
        allow_network=True,
    )
    assert ran.status is ExecutionStatus.COMPLETED
    host = {line.split(":")[0].strip() for line in Path("/proc/net/dev").read_text().splitlines()[2:]}
    assert set(ran.stdout.decode().split()) == host


def test_the_sandbox_has_its_own_pid_and_host_name(tmp_path: Path) -> None:
    """The command sees only its own processes and its own host name: the host's stay invisible."""
    root = tmp_path / "root"
    root.mkdir()
    ran = run(["sh", "-c", "hostname; ls /proc | grep -c '^[0-9]'"], root)
    assert ran.status is ExecutionStatus.COMPLETED
    name, count = ran.stdout.decode().split()
    assert name == "sandbox" and int(count) < 10


def test_a_relative_root_path_is_a_configuration_error() -> None:
    """A view of relative paths would depend on the worker's directory: refused at start-up."""
    with pytest.raises(ConfigError, match="normalized absolute path"):
        sandbox(root_paths=("usr",))


def test_example_config_parses_and_documents_every_option() -> None:
    """The example an operator copies starts a sandbox default, and no option is undocumented."""
    config = load_config(EXAMPLE)
    executor = config.executors[config.default_executor]
    assert isinstance(executor, SandboxExecutorConfig) and not executor.allow_network
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#?\s*([a-z_]+)\s*=", text, flags=re.MULTILINE))
    keys |= set(re.findall(r"^\[executor\.sandbox\.([a-z_]+)\]", text, flags=re.MULTILINE))
    missing = {f.name for f in dataclasses.fields(SandboxExecutorConfig)} - keys
    assert not missing, f"undocumented options: {sorted(missing)}"
