"""Backend fixtures: a bubblewrap sandbox, Podman's Docker-compatible service and gVisor on Docker.

Each is skipped with its reason where its tool is missing, and fails instead where
EXPBUILD_REQUIRE_BACKENDS=1 (set by .ci/run) demands it.
"""

from __future__ import annotations

import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docker"))

from _dockerkit import docker_executor, gone_within, new_worker_id, remove_labelled
from _support import unavailable as shared_unavailable

from expbuild_worker.execution.executor import Executor
from expbuild_worker.execution.sandbox import SandboxExecutor
from expbuild_worker.model import ResourceLimits

IMAGE = "expbuild-test/busybox:1"
SANDBOX_USER = (65534, 65534) if os.geteuid() == 0 else None


def unavailable(reason: str) -> NoReturn:
    """Skip where the backend is optional; fail where CI=true or EXPBUILD_REQUIRE_BACKENDS=1 demands it."""
    shared_unavailable(reason, flag="EXPBUILD_REQUIRE_BACKENDS")


@dataclass
class Backend:
    """One way to run an action with isolation, and how to see what it left behind."""

    name: str
    executor: Callable[[], contextlib.AbstractAsyncContextManager[Executor]]
    leftovers: Callable[[Executor], bool]
    """True when nothing of the executor's actions is left (containers, processes)."""
    cleanup: Callable[[Executor], None] = lambda _ex: None


def build_busybox_image(client: Any) -> None:
    """A FROM-scratch image of the static busybox and its applet links, built on ``client``'s engine."""
    busybox = "/bin/busybox"
    if not os.path.isfile(busybox):
        unavailable("the static busybox (Debian's busybox-static) is not installed")
    dockerfile = b'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(dockerfile)
        tar.addfile(info, io.BytesIO(dockerfile))
        tar.add(busybox, arcname="busybox")
    buf.seek(0)
    client.images.build(
        fileobj=buf, custom_context=True, tag=IMAGE, rm=True, labels={"io.expbuild.project": "tests"}
    )


def _processes_with(marker: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if marker.encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                    found.append(int(entry))
    return found


def _sandbox() -> Backend:
    if shutil.which("bwrap") is None:
        unavailable("bubblewrap (bwrap) is not installed")

    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Executor]:
        ex = SandboxExecutor(
            name="sandbox",
            kill_grace_seconds=0.5,
            refuse_unenforceable_limits=False,
            default_limits=ResourceLimits(),
            max_limits=ResourceLimits(),
            worker_id=new_worker_id(),
            run_as=SANDBOX_USER,
        )
        await ex.start()
        ready = await ex.readiness()
        if not ready.ready:
            await ex.close()
            unavailable(ready.message)
        try:
            yield ex
        finally:
            await ex.close()

    def leftovers(_ex: Executor) -> bool:
        deadline = time.monotonic() + 5
        while _processes_with("expbuild-marker"):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    return Backend(name="sandbox", executor=make, leftovers=leftovers)


def _docker_backend(name: str, client: Any, **settings: Any) -> Backend:
    @contextlib.asynccontextmanager
    async def make() -> AsyncIterator[Executor]:
        async with docker_executor(IMAGE, **settings) as ex:
            ready = await ex.readiness()
            if not ready.ready:
                unavailable(f"{name}: {ready.message}")
            yield ex

    return Backend(
        name=name,
        executor=make,
        leftovers=lambda ex: gone_within(client, ex.worker_id),  # type: ignore[attr-defined]
        cleanup=lambda ex: remove_labelled(client, ex.worker_id),  # type: ignore[attr-defined]
    )


@pytest.fixture(scope="session")
def podman_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `podman system service` on a socket in a temporary directory, stopped afterwards."""
    if shutil.which("podman") is None:
        unavailable("podman is not installed")
    directory = tmp_path_factory.mktemp("podman")
    address = f"unix://{directory}/podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", address],
        # conmon drops an "oom" marker file into the service's working directory when a
        # container is OOM-killed (Podman 4.3 with the compat API): keep it out of the checkout.
        cwd=directory,
        stdout=subprocess.DEVNULL,
        stderr=open(directory / "service.log", "wb"),  # noqa: SIM115 - closed with the process
    )
    try:
        deadline = time.monotonic() + 30
        while not (directory / "podman.sock").exists():
            if service.poll() is not None or time.monotonic() > deadline:
                unavailable(
                    f"podman system service did not start: {(directory / 'service.log').read_text()[-500:]}"
                )
            time.sleep(0.1)
        yield address
    finally:
        service.terminate()
        try:
            service.wait(10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()


def _client(address: str | None) -> Any:
    try:
        import docker

        client = (
            docker.DockerClient(base_url=address, timeout=120) if address else docker.from_env(timeout=120)
        )
        client.ping()
    except Exception as err:
        unavailable(f"no engine answers at {address or 'the default socket'}: {err}")
    return client


def podman_ulimits() -> dict[str, int]:
    """nofile and nproc at most the hard limits of this process, which runs Podman: without
    CAP_SYS_RESOURCE its OCI runtime cannot raise them to Podman's defaults."""

    def within(kind: int, wanted: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)

    return {
        "ulimits_nofile": within(resource.RLIMIT_NOFILE, 4096),
        "ulimits_nproc": within(resource.RLIMIT_NPROC, 4096),
    }


@pytest.fixture(scope="session", params=["sandbox", "podman", "gvisor"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Each isolating backend in turn."""
    if request.param == "sandbox":
        yield _sandbox()
        return
    if request.param == "podman":
        address = request.getfixturevalue("podman_socket")
        client = _client(address)
        build_busybox_image(client)
        yield _docker_backend("podman", client, docker_host=address, **podman_ulimits())
        client.close()
        return
    client = _client(None)
    if "runsc" not in client.info().get("Runtimes", {}):
        unavailable("the Docker engine has no runsc runtime (scripts/ensure-runsc.sh registers it)")
    build_busybox_image(client)
    yield _docker_backend("gvisor", client, runtime="runsc")
    client.close()
