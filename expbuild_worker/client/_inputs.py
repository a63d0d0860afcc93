"""Local files and directories turned into an action's inputs, uploaded by digest."""

from __future__ import annotations

import os
import posixpath
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.api.v1.digests import digest_to_pb
from expbuild_worker.errors import InvalidRequestError
from expbuild_worker.model import Digest
from expbuild_worker.validation import is_valid_relative_path

__all__ = ["InputSpec", "InputTree", "LocalFile", "collect_inputs", "parse_input_spec"]


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One ``LOCAL[:REMOTE]`` argument; ``remote`` is "" for the action root itself."""

    local: Path
    remote: str


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A regular local file that becomes ``remote`` in the action root."""

    local: Path
    remote: str
    digest: Digest
    is_executable: bool


@dataclass(frozen=True, slots=True)
class InputTree:
    """Everything to materialise: files (by digest), directories and in-tree symlinks."""

    files: tuple[LocalFile, ...] = ()
    directories: tuple[str, ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()

    def blobs(self) -> dict[Digest, Path]:
        """One local file per distinct non-empty digest: what must be in the worker's store."""
        out: dict[Digest, Path] = {}
        for f in self.files:
            if f.digest.size > 0:
                out.setdefault(f.digest, f.local)
        return out

    def add_to(self, request: pb.ExecuteRequest) -> None:
        """Append the inputs to ``request``; empty files go inline, the rest by digest."""
        for f in self.files:
            if f.digest.size == 0:
                request.input_files.add(path=f.remote, content=b"", is_executable=f.is_executable)
            else:
                request.input_files.add(
                    path=f.remote, digest=digest_to_pb(f.digest), is_executable=f.is_executable
                )
        for d in self.directories:
            request.input_directories.add(path=d)
        for path, target in self.symlinks:
            request.input_symlinks.add(path=path, target=target)


def parse_input_spec(spec: str) -> InputSpec:
    """Parse ``LOCAL[:REMOTE]``.

    A spec that names an existing path as a whole is all LOCAL (so local names may contain
    ":"). REMOTE defaults to LOCAL when LOCAL is a normalised relative path ("." is the
    action root), else to LOCAL's base name. REMOTE "" or "." means the action root, which
    only a directory can be.
    """
    if os.path.lexists(spec) or ":" not in spec:
        local, remote = spec, None
    else:
        local, remote = spec.split(":", 1)
    if not local:
        raise InvalidRequestError(f"input {spec!r}: LOCAL must not be empty")
    if remote is None:
        norm = posixpath.normpath(local)
        if norm == ".":
            remote = ""
        elif is_valid_relative_path(norm):
            remote = norm
        else:
            remote = Path(local).resolve().name
    elif remote in ("", "."):
        remote = ""
    elif not is_valid_relative_path(remote):
        raise InvalidRequestError(
            f"input {spec!r}: REMOTE must be a normalised relative path without '..', got {remote!r}"
        )
    return InputSpec(Path(local), remote)


def collect_inputs(specs: Iterable[InputSpec]) -> InputTree:
    """Walk the specs: files are digested, directories recursed, symlinks kept when they stay inside.

    A symlink inside an uploaded directory whose relative target stays inside that directory
    is sent as a symlink; one pointing elsewhere is uploaded as the file it points to; one
    pointing elsewhere at a directory, or at nothing, is refused. Raises InvalidRequestError
    naming the local path on any problem, including two inputs claiming one remote path.
    """
    collector = _Collector()
    for spec in specs:
        collector.add_spec(spec)
    return InputTree(
        files=tuple(collector.files.values()),
        directories=tuple(sorted(collector.directories)),
        symlinks=tuple(sorted(collector.symlinks.items())),
    )


class _Collector:
    def __init__(self) -> None:
        self.files: dict[str, LocalFile] = {}
        self.directories: set[str] = set()
        self.symlinks: dict[str, str] = {}
        self._claimed: dict[str, Path] = {}

    def _claim(self, remote: str, local: Path) -> None:
        if remote in self._claimed:
            raise InvalidRequestError(
                f"input {local}: remote path {remote!r} is already taken by {self._claimed[remote]}"
            )
        self._claimed[remote] = local

    def add_spec(self, spec: InputSpec) -> None:
        try:
            st = spec.local.stat()
        except OSError as err:
            raise InvalidRequestError(f"input {spec.local}: cannot read: {err.strerror}") from err
        if stat.S_ISDIR(st.st_mode):
            if spec.remote:
                self._claim(spec.remote, spec.local)
                self.directories.add(spec.remote)
            self._walk(spec.local, spec.remote, top=spec.remote)
        elif stat.S_ISREG(st.st_mode):
            if not spec.remote:
                raise InvalidRequestError(f"input {spec.local}: a file needs a REMOTE path, not the root")
            self._add_file(spec.local, spec.remote)
        else:
            raise InvalidRequestError(f"input {spec.local}: not a regular file or directory")

    def _add_file(self, local: Path, remote: str) -> None:
        self._claim(remote, local)
        try:
            executable = bool(local.stat().st_mode & 0o111)
            digest = Digest.of_file(local)
        except OSError as err:
            raise InvalidRequestError(f"input {local}: cannot read: {err.strerror}") from err
        self.files[remote] = LocalFile(local, remote, digest, executable)

    def _walk(self, local_dir: Path, remote_dir: str, *, top: str) -> None:
        try:
            entries = sorted(os.scandir(local_dir), key=lambda e: e.name)
        except OSError as err:
            raise InvalidRequestError(f"input {local_dir}: cannot list: {err.strerror}") from err
        for entry in entries:
            local = Path(entry.path)
            remote = f"{remote_dir}/{entry.name}" if remote_dir else entry.name
            if entry.is_symlink():
                self._add_symlink(local, remote, top=top)
            elif entry.is_dir(follow_symlinks=False):
                self._claim(remote, local)
                self.directories.add(remote)
                self._walk(local, remote, top=top)
            elif entry.is_file(follow_symlinks=False):
                self._add_file(local, remote)
            else:
                raise InvalidRequestError(f"input {local}: not a regular file, directory or symlink")

    def _add_symlink(self, local: Path, remote: str, *, top: str) -> None:
        target = os.readlink(local)
        if not target.startswith("/"):
            resolved = posixpath.normpath(posixpath.join(posixpath.dirname(remote), target))
            inside = resolved != ".." and not resolved.startswith("../")
            if inside and (not top or resolved == top or resolved.startswith(top + "/")):
                self._claim(remote, local)
                self.symlinks[remote] = target
                return
        try:
            st = local.stat()
        except OSError as err:
            raise InvalidRequestError(
                f"input {local}: symlink to {target!r} points outside the input and cannot be followed"
            ) from err
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequestError(
                f"input {local}: symlink to {target!r} points outside the input, not at a regular file"
            )
        self._add_file(local, remote)
