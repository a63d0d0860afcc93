"""Collect declared outputs into the store without ever following a symlink out of the action root."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from expbuild_worker.model import OutputFile, OutputManifest, OutputSymlink
from expbuild_worker.storage import ContentAddressedStore
from expbuild_worker.validation import output_path_problem


class OutputLimitExceeded(Exception):
    """The outputs are more than a result may carry: too many bytes, entries or levels, or too long a path."""


MAX_LISTING_BYTES = 3 << 20
"""What a result's list of outputs may take (paths and digests). A result must fit one gRPC
message, and a client's default limit is 4 MiB; a tree with more entries belongs in an archive."""

MAX_NAMED_UNREPORTABLE = 10
"""How many outputs with names that are not UTF-8 a result names (the rest are counted)."""

_ENTRY_BYTES = 80
"""Roughly what one output entry adds to the result besides its path (digest, size, flags)."""


@dataclass
class _Collector:
    root: Path
    store: ContentAddressedStore
    max_bytes: int
    total: int = 0
    files: dict[str, OutputFile] = field(default_factory=dict)
    symlinks: dict[str, OutputSymlink] = field(default_factory=dict)
    directories: set[str] = field(default_factory=set)
    unreportable: list[str] = field(default_factory=list)  # the first few, as printable paths
    unreportable_count: int = 0
    listing: int = 0  # bytes the entries so far add to the result, roughly

    def _listed(self, size: int) -> None:
        """Count one more entry of ``size`` path bytes; past MAX_LISTING_BYTES the outputs are too many."""
        self.listing += size + _ENTRY_BYTES
        if self.listing > MAX_LISTING_BYTES:
            entries = len(self.files) + len(self.symlinks) + len(self.directories)
            raise OutputLimitExceeded(
                f"outputs list more than {entries} entries, over what one result carries "
                f"(~{MAX_LISTING_BYTES >> 20} MiB of paths and digests); pack large trees into one file"
            )

    def _utf8_size(self, rel: str, *, target: str = "") -> int | None:
        """``rel``'s size in UTF-8, or None (noted) when it or a symlink's ``target`` is not UTF-8."""
        try:
            size = len(rel.encode())
            target.encode()
        except UnicodeEncodeError:
            self.unreportable_count += 1
            if len(self.unreportable) < MAX_NAMED_UNREPORTABLE:
                self.unreportable.append(os.fsencode(rel).decode(errors="backslashreplace"))
            return None
        return size

    def _open_parent(self, rel: str) -> int | None:
        """Open the directory holding ``rel`` by walking with O_NOFOLLOW; None if any part is missing
        or is not a real directory (a symlinked parent is never traversed)."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        for part in rel.split("/")[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:
                os.close(fd)
                return None
            os.close(fd)
            fd = nxt
        return fd

    def add_path(self, rel: str, *, want_directory: bool) -> None:
        parent = self._open_parent(rel)
        if parent is None:
            return
        try:
            name = rel.rsplit("/", 1)[-1]
            try:
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                return
            self._listed(len(rel.encode()))
            if stat.S_ISLNK(st.st_mode):
                self._add_symlink(rel, parent, name)
            elif stat.S_ISREG(st.st_mode) and not want_directory:
                self._add_file(rel, parent, name, st)
            elif stat.S_ISDIR(st.st_mode) and want_directory:
                dfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=parent)
                try:
                    self._walk(rel, dfd)
                finally:
                    os.close(dfd)
        finally:
            os.close(parent)

    def _walk(self, rel: str, dfd: int) -> None:
        self.directories.add(rel)
        for entry in sorted(os.listdir(dfd)):
            child = f"{rel}/{entry}"
            size = self._utf8_size(child)
            if size is None:
                continue
            problem = output_path_problem(child, size)
            if problem:
                raise OutputLimitExceeded(problem)
            self._listed(size)
            st = os.stat(entry, dir_fd=dfd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                self._add_symlink(child, dfd, entry)
            elif stat.S_ISREG(st.st_mode):
                self._add_file(child, dfd, entry, st)
            elif stat.S_ISDIR(st.st_mode):
                sub = os.open(entry, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    self._walk(child, sub)
                finally:
                    os.close(sub)
            # sockets, fifos and devices are not outputs

    def _add_symlink(self, rel: str, dfd: int, name: str) -> None:
        target = os.readlink(name, dir_fd=dfd)
        if self._utf8_size(rel, target=target) is not None:
            self.symlinks[rel] = OutputSymlink(rel, target)

    def _add_file(self, rel: str, dfd: int, name: str, st: os.stat_result) -> None:
        self.total += st.st_size
        if self.total > self.max_bytes:
            raise OutputLimitExceeded(
                f"outputs exceed execution.max_output_bytes ({self.max_bytes} bytes) at {rel!r}"
            )
        digest = self.store.adopt_file(name, dir_fd=dfd)
        self.files[rel] = OutputFile(rel, digest, bool(st.st_mode & 0o111))


def collect_outputs(
    root: Path,
    *,
    output_files: tuple[str, ...],
    output_directories: tuple[str, ...],
    store: ContentAddressedStore,
    max_bytes: int,
) -> OutputManifest:
    """Return the manifest of every declared output that exists; raise OutputLimitExceeded past the cap."""
    collector = _Collector(root=root, store=store, max_bytes=max_bytes)
    for rel in output_files:
        collector.add_path(rel, want_directory=False)
    for rel in output_directories:
        collector.add_path(rel, want_directory=True)
    return OutputManifest(
        files=tuple(collector.files[k] for k in sorted(collector.files)),
        symlinks=tuple(collector.symlinks[k] for k in sorted(collector.symlinks)),
        directories=tuple(sorted(collector.directories)),
        unreportable=tuple(collector.unreportable),
        unreportable_count=collector.unreportable_count,
    )
