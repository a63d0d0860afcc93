"""The container an action runs in: hardening, limits, mounts and labels, as a Docker API create body."""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from expbuild_worker.config import DockerExecutorConfig, IoMode
from expbuild_worker.errors import PreconditionError
from expbuild_worker.execution.executor import Command
from expbuild_worker.model import ResourceLimits

BIND_ROOT = "/work"
"""Where the action's directory appears when bind-mounted from this machine."""

ARCHIVE_VOLUME = "/work"
ARCHIVE_ROOT = "/work/root"
"""With archive I/O the action's directory is copied into a fresh anonymous volume. It is one
level down because the daemon never changes the owner of the directory it extracts into, and
the command's user must own the directory it writes its outputs to."""

LABEL_PROJECT = "io.expbuild.project"
LABEL_WORKER = "io.expbuild.worker-id"
LABEL_EXECUTOR = "io.expbuild.executor"
LABEL_EXECUTION = "io.expbuild.execution-id"
LABEL_ACTION = "io.expbuild.action"
LABEL_CREATED = "io.expbuild.created"
PROJECT = "expbuild-worker"

RUNSC_PIDS_OVERHEAD = 128
"""gVisor's Sentry threads count against the container's PIDs limit; give them room."""

RUNTIME_INIT_PIDS = 16
"""Room under a container's PIDs limit for the OCI runtime's own init while it sets the
container up. runc's init is a Go program with several threads already in the container's
cgroup: under an exact, small ``pids.max`` it can fail to make one more thread and die, which
the engine reports as ``cannot start an already running container``. Where the executor can
write the container's cgroup it creates the container with this room and sets the exact limit
as soon as the command runs (``exact_pids_max``)."""

_NUMERIC_USER = re.compile(r"^(\d+)(?::(\d+))?$")


def exact_pids_max(limits: ResourceLimits, hardening: Hardening, *, idle: int = 0) -> int | None:
    """The container's ``pids.max`` for ``limits``: the limit is the command's, so the init
    process, gVisor's own tasks and ``idle`` processes already running come on top."""
    if limits.max_processes is None:
        return None
    overhead = (RUNSC_PIDS_OVERHEAD if "runsc" in hardening.runtime else 0) + (1 if hardening.init else 0)
    return limits.max_processes + overhead + idle


def root_in_container(io_mode: IoMode) -> str:
    return BIND_ROOT if io_mode == "bind" else ARCHIVE_ROOT


def numeric_user(user: str) -> tuple[int, int] | None:
    """``uid[:gid]`` as numbers (gid defaults to uid), or None for a name or the image's default."""
    match = _NUMERIC_USER.match(user)
    if match is None:
        return None
    uid = int(match.group(1))
    return uid, int(match.group(2)) if match.group(2) is not None else uid


def is_virtualized_runtime(runtime: str) -> bool:
    """Runtimes with their own kernel (gVisor, Kata) isolate more than a namespaced container."""
    return "runsc" in runtime or "gvisor" in runtime or runtime.startswith("kata")


@dataclass(frozen=True, slots=True, kw_only=True)
class Hardening:
    """Everything about the container that comes from configuration rather than the request.

    No field has a default: the defaults are DockerExecutorConfig's, and ``from_config`` is
    the one way from those to here.
    """

    readonly_rootfs: bool
    mount_tmpfs: bool
    tmpfs_size_bytes: int
    security_opts: tuple[str, ...]
    drop_all_capabilities: bool
    user: str
    init: bool
    runtime: str
    network_mode: str
    network_mode_when_enabled: str
    ulimits: tuple[tuple[str, int], ...]
    """(name, value) rlimits set soft and hard alike; Podman needs ``nofile`` and ``nproc`` within
    its own hard limits, or its OCI runtime fails to set them ("error setting rlimit")."""

    @classmethod
    def from_config(cls, config: DockerExecutorConfig, *, seccomp_profile: str = "") -> Hardening:
        """The hardening ``config`` asks for; a ``seccomp_profile`` (its JSON) joins the security options."""
        security_opts = tuple(config.security_opts)
        if seccomp_profile:
            security_opts += (f"seccomp={seccomp_profile}",)
        return cls(
            readonly_rootfs=config.readonly_rootfs,
            mount_tmpfs=config.mount_tmpfs,
            tmpfs_size_bytes=config.tmpfs_size_bytes,
            security_opts=security_opts,
            drop_all_capabilities=config.drop_all_capabilities,
            user=config.user,
            init=config.init,
            runtime=config.runtime,
            network_mode=config.network_mode,
            network_mode_when_enabled=config.network_mode_when_enabled,
            ulimits=tuple(
                (name, value)
                for name, value in (("nofile", config.ulimits_nofile), ("nproc", config.ulimits_nproc))
                if value > 0
            ),
        )


def network_mode_for(limits: ResourceLimits, hardening: Hardening, *, executor: str) -> str:
    """The network an action gets: the configured mode unless it asks for network access.

    Asking for network when no ``network_mode_when_enabled`` is configured is refused rather
    than silently run without it.
    """
    if limits.network is True:
        if not hardening.network_mode_when_enabled:
            raise PreconditionError(
                f"limits.network: executor {executor!r} does not grant network access "
                "(no network_mode_when_enabled is configured)"
            )
        return hardening.network_mode_when_enabled
    return hardening.network_mode


def container_body(
    *,
    image: str,
    command: Command,
    hardening: Hardening,
    network_mode: str,
    labels: Mapping[str, str],
    io_mode: IoMode,
    cgroup_parent: str | None,
    pids_room: int = 0,
    memory_in_parent: bool = False,
) -> dict[str, Any]:
    """The ``POST /containers/create`` body for ``command``.

    ``memory_in_parent``: the memory limit is not the container's, the cgroup parent (which the
    caller made) holds it. ``pids_room`` is added to the PIDs limit for the runtime's init
    (``RUNTIME_INIT_PIDS``); whoever passes it sets ``exact_pids_max`` on the container's cgroup
    once the command runs.

    The argv replaces the image's entrypoint and command, so an image cannot wrap it. The
    environment is exactly the command's (the daemon adds PATH and HOSTNAME when absent).
    Logs go only to the attached stream (driver ``none``), so nothing is written twice.
    """
    if not command.argv:
        raise PreconditionError(f"action {command.execution_id}: argv is empty; nothing to run")
    limits = command.limits
    root = root_in_container(io_mode)
    host_config: dict[str, Any] = {
        "NetworkMode": network_mode,
        "ReadonlyRootfs": hardening.readonly_rootfs,
        "SecurityOpt": list(hardening.security_opts),
        "Init": hardening.init,
        "IpcMode": "private",
        "Privileged": False,
        "LogConfig": {"Type": "none", "Config": {}},
    }
    if hardening.drop_all_capabilities:
        host_config["CapDrop"] = ["ALL"]
    if hardening.mount_tmpfs:
        host_config["Tmpfs"] = {"/tmp": f"rw,exec,nosuid,nodev,size={hardening.tmpfs_size_bytes}"}
    if hardening.runtime:
        host_config["Runtime"] = hardening.runtime
    if hardening.ulimits:
        host_config["Ulimits"] = [{"Name": n, "Soft": v, "Hard": v} for n, v in hardening.ulimits]
    if io_mode == "bind":
        host_config["Mounts"] = [
            {"Type": "bind", "Source": str(command.root), "Target": BIND_ROOT, "ReadOnly": False}
        ]
    else:
        host_config["Mounts"] = [{"Type": "volume", "Target": ARCHIVE_VOLUME}]
    if limits.memory_bytes is not None and not memory_in_parent:
        host_config["Memory"] = limits.memory_bytes
        host_config["MemorySwap"] = limits.memory_bytes  # equal: swap cannot extend the limit
    if limits.cpu_cores is not None:
        host_config["NanoCpus"] = round(limits.cpu_cores * 1e9)
    pids_max = exact_pids_max(limits, hardening)
    if pids_max is not None:
        host_config["PidsLimit"] = pids_max + pids_room
    if cgroup_parent:
        host_config["CgroupParent"] = cgroup_parent
    with_stdin = bool(command.stdin)
    return {
        "Image": image,
        "Entrypoint": [command.argv[0]],
        "Cmd": list(command.argv[1:]),
        "Env": [f"{key}={value}" for key, value in command.environment.items()],
        "WorkingDir": posixpath.join(root, command.working_directory) if command.working_directory else root,
        "User": hardening.user,
        "Labels": dict(labels),
        "Tty": False,
        "OpenStdin": with_stdin,
        "StdinOnce": with_stdin,
        "AttachStdin": with_stdin,
        "AttachStdout": True,
        "AttachStderr": True,
        "HostConfig": host_config,
    }
