"""What a sandboxed command sees of the file system, its bubblewrap arguments, and argv[0] looked up there."""

from __future__ import annotations

import os
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from expbuild_worker.execution.process import SpawnFailure

_MAX_LINKS = 40
"""Symbolic links followed in one lookup before giving up, as the kernel does (ELOOP)."""


@dataclass(frozen=True, slots=True)
class SandboxView:
    """The sandbox's mount table: ``binds`` maps sandbox paths to host directories or files
    (read-only, except the action directory), ``links`` holds the symbolic links bubblewrap
    creates (``/bin -> usr/bin`` where the host has merged /usr). Every other path is the empty
    tmpfs root bubblewrap builds, holding only the parents of those mount points, plus the
    private ``/tmp``, ``/proc`` and ``/dev``, which hold no commands at start."""

    binds: Mapping[str, str]
    links: Mapping[str, str]

    def host_path(self, path: str) -> str | None:
        """Where the sandbox path ``path`` (absolute, symbolic links already resolved) lives on the
        host; None when it is not under a bind mount."""
        best = ""
        for mount in self.binds:
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best):
                best = mount
        if not best:
            return None
        rest = path[len(best) :].lstrip("/")
        return os.path.join(self.binds[best], rest) if rest else self.binds[best]

    def resolve(self, path: str) -> tuple[str, str | None]:
        """Follow ``path`` (absolute, in the sandbox) through the view's links and the host's links
        under its binds, each resolved in the sandbox; returns the final sandbox path and its host
        path (None: not a host file). Raises SpawnFailure on a link loop."""
        pending = [part for part in path.split("/") if part]
        done = "/"
        links = 0
        while pending:
            part = pending.pop(0)
            if part == ".":
                continue
            if part == "..":
                done = posixpath.dirname(done)
                continue
            current = posixpath.join(done, part)
            target = self.links.get(current)
            if target is None:
                host = self.host_path(current)
                if host is not None and os.path.islink(host):
                    target = os.readlink(host)
            if target is None:
                done = current
                continue
            links += 1
            if links > _MAX_LINKS:
                raise SpawnFailure(f"{path!r}: too many levels of symbolic links in the sandbox")
            pending = [p for p in target.split("/") if p] + pending
            if target.startswith("/"):
                done = "/"
        return done, self.host_path(done)

    def find_executable(self, argv0: str, environment: Mapping[str, str], cwd: str) -> str:
        """Find ``argv0`` in the sandbox as execvp would there, on the command's PATH (never the
        worker's): a name with a slash is taken as is, relative to ``cwd`` (the sandbox working
        directory); relative PATH entries are relative to ``cwd``. Returns the sandbox path found;
        raises SpawnFailure naming argv[0] when there is none to run."""
        if not argv0:
            raise SpawnFailure("argv[0] is empty")
        if "/" in argv0:
            candidates = [posixpath.join(cwd, argv0)]
        else:
            search = environment.get("PATH")
            if search is None:
                raise SpawnFailure(
                    f"argv[0] {argv0!r} is not a path and the command's environment has no PATH"
                )
            candidates = [posixpath.join(cwd, entry or ".", argv0) for entry in search.split(":")]
        denied = False
        for candidate in candidates:
            resolved, host = self.resolve(posixpath.normpath(candidate))
            if host is not None and os.path.isfile(host):
                if os.access(host, os.X_OK):
                    return resolved
                denied = True
        where = "" if "/" in argv0 else f" in the command's PATH {environment.get('PATH')!r}"
        if denied:
            raise SpawnFailure(f"argv[0] {argv0!r}: permission denied in the sandbox{where}")
        raise SpawnFailure(f"argv[0] {argv0!r}: not found in the sandbox{where}")


def view_of(root_paths: Sequence[str]) -> SandboxView:
    """The read-only part of the view: each host path in ``root_paths`` at the same path, a
    symbolic link there recreated as one, a missing path left out. Read once, when the
    executor is made."""
    binds: dict[str, str] = {}
    links: dict[str, str] = {}
    for path in root_paths:
        if os.path.islink(path):
            links[path] = os.readlink(path)
        elif os.path.exists(path):
            binds[path] = path
    return SandboxView(binds=binds, links=links)


def bwrap_arguments(
    view: SandboxView,
    *,
    work_directory: str,
    cwd: str,
    network: bool,
    tmpfs_size_bytes: int,
    hostname: str,
) -> list[str]:
    """bubblewrap's options for ``view``: new user, PID, IPC, UTS, cgroup and mount namespaces
    (and network unless ``network``), no further user namespaces inside, every capability
    dropped, the read-only root (its own tmpfs too), the writable action directory, a private ``/tmp`` of
    ``tmpfs_size_bytes``, and the sandbox dying with its bubblewrap (whose process group and
    cgroup the runner kills)."""
    args = [
        "--unshare-user",
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-uts",
        "--unshare-cgroup",
        *(() if network else ("--unshare-net",)),
        "--disable-userns",
        "--die-with-parent",
        "--cap-drop",
        "ALL",
        "--hostname",
        hostname,
    ]
    for path, host in sorted(view.binds.items(), key=lambda item: (item[0].count("/"), item[0])):
        if path != work_directory:  # parents before what is mounted inside them
            args += ["--ro-bind", host, path]
    for path, target in view.links.items():
        if view.host_path(path) is None:  # a link inside a bind is already there
            args += ["--symlink", target, path]
    args += ["--proc", "/proc", "--dev", "/dev", "--size", str(tmpfs_size_bytes), "--tmpfs", "/tmp"]
    args += ["--bind", view.binds[work_directory], work_directory]
    # bubblewrap's root is a writable tmpfs holding the mount points: made read-only last.
    args += ["--remount-ro", "/", "--chdir", cwd]
    return args
