"""Collect declared outputs into the store without ever following a symlink out of the action root."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from expbuild_worker.errors import InvalidRequestError, OutputLimitExceeded, ResourceExhaustedError
from expbuild_worker.model import Digest, OutputFile, OutputManifest, OutputSymlink
from expbuild_worker.storage import BlobPin, BlobStore
from expbuild_worker.validation import output_path_problem

MAX_LISTING_BYTES = 3 << 20
"""What a result's list of outputs may take on the wire: every path, symlink target and digest,
with each entry's framing. A result must fit one gRPC message and a client's default limit is
4 MiB; the last MiB is left for the rest of the result (message, stats, log summaries). A tree
with more belongs in an archive."""

MAX_NAMED_UNREPORTABLE = 10
"""How many outputs with names that are not UTF-8 a result names (the rest are counted)."""

MAX_NAMED_PROBLEMS = 10
"""How many outputs that could not be collected a result names; one more entry counts the rest."""

_MAX_PROBLEM_PATH = 200
"""Characters of a path a problem quotes: enough to find it, and a result stays small."""

_ENTRY_BYTES = 16
"""The most one entry's framing adds on the wire: the entry's tag and length, and those of its
path and (for a symlink) target. Paths are at most MAX_PATH_BYTES, so each length fits 2 bytes."""

_FILE_BYTES = 96
"""What a file entry adds besides its path: its digest (64 hex digits and a size), its executable
flag, and their framing."""

_ABSENT = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
"""Errors that mean "there is no such output": gone, or behind something that is not a real
directory (a symlinked parent is never traversed, so O_NOFOLLOW's ELOOP is absence too)."""

_Want = Literal["file", "directory", "any"]


def _printable(path: str) -> str:
    """``path`` as text a result can carry (bytes that are not UTF-8 escaped)."""
    return os.fsencode(path).decode(errors="backslashreplace")


def _reason(err: OSError) -> str:
    """An OS error without its file names: those are the worker's own paths, not the client's."""
    return err.strerror or type(err).__name__


@dataclass
class _Collector:
    store: BlobStore
    max_bytes: int
    pin: BlobPin | None
    total: int = 0  # file bytes so far, each inode once
    listing: int = 0  # bytes the entries so far add to the result on the wire
    files: dict[str, OutputFile] = field(default_factory=dict)
    symlinks: dict[str, OutputSymlink] = field(default_factory=dict)
    directories: set[str] = field(default_factory=set)
    adopted: dict[tuple[int, int], Digest] = field(default_factory=dict)  # (st_dev, st_ino) -> digest
    unreportable: list[str] = field(default_factory=list)  # the first few, as printable paths
    unreportable_count: int = 0
    problems: list[str] = field(default_factory=list)  # the first few, as "path: reason"
    problem_count: int = 0

    def manifest(self) -> OutputManifest:
        problems = list(self.problems)
        if self.problem_count > len(problems):
            problems.append(f"and {self.problem_count - len(problems)} more outputs could not be collected")
        return OutputManifest(
            files=tuple(self.files[k] for k in sorted(self.files)),
            symlinks=tuple(self.symlinks[k] for k in sorted(self.symlinks)),
            directories=tuple(sorted(self.directories)),
            unreportable=tuple(self.unreportable),
            unreportable_count=self.unreportable_count,
            problems=tuple(problems),
        )

    def problem(self, rel: str, reason: str) -> None:
        """Note an output that exists but cannot be collected; only the first few are named."""
        self.problem_count += 1
        if len(self.problems) < MAX_NAMED_PROBLEMS:
            shown = _printable(rel)
            if len(shown) > _MAX_PROBLEM_PATH:
                shown = shown[:_MAX_PROBLEM_PATH] + "..."
            self.problems.append(f"{shown}: {reason}")

    def failed(self, rel: str, err: OSError) -> None:
        """An OS error on ``rel``: absence when it is gone, a problem otherwise."""
        if err.errno not in _ABSENT:
            self.problem(rel, _reason(err))

    def _listed(self, size: int) -> None:
        """Count ``size`` more bytes of result; past MAX_LISTING_BYTES the outputs are too many."""
        self.listing += size
        if self.listing > MAX_LISTING_BYTES:
            entries = len(self.files) + len(self.symlinks) + len(self.directories)
            raise OutputLimitExceeded(
                f"outputs list more than {entries} entries, over what one result carries "
                f"(~{MAX_LISTING_BYTES >> 20} MiB of paths, symlink targets and digests); "
                "pack large trees into one file"
            )

    def _utf8_size(self, rel: str, *, target: str = "") -> int | None:
        """``rel``'s and ``target``'s size in UTF-8, or None (noted) when either is not UTF-8."""
        try:
            size = len(rel.encode()) + len(target.encode())
        except UnicodeEncodeError:
            self.unreportable_count += 1
            if len(self.unreportable) < MAX_NAMED_UNREPORTABLE:
                self.unreportable.append(_printable(rel))
            return None
        return size

    def _open_parent(self, root_fd: int, rel: str) -> int | None:
        """Open the directory holding ``rel`` by walking with O_NOFOLLOW; None if any part is
        missing or is not a real directory (a symlinked parent is never traversed), or could not
        be opened (noted as a problem)."""
        try:
            fd = os.dup(root_fd)
        except OSError as err:  # out of descriptors, say
            self.failed(rel, err)
            return None
        for part in rel.split("/")[:-1]:
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as err:
                os.close(fd)
                self.failed(rel, err)
                return None
            os.close(fd)
            fd = nxt
        return fd

    def add_declared(self, root_fd: int, rel: str, *, want: _Want) -> None:
        """Collect the declared output ``rel`` (a path the request carried, so valid UTF-8)."""
        parent = self._open_parent(root_fd, rel)
        if parent is None:
            return
        try:
            self._add(rel, parent, rel.rsplit("/", 1)[-1], size=len(rel.encode()), want=want)
        finally:
            os.close(parent)

    def _add(self, rel: str, dfd: int, name: str, *, size: int, want: _Want) -> None:
        """Collect ``name`` in ``dfd`` as ``rel`` (``size`` UTF-8 bytes) if it is what is wanted.

        A path already listed is skipped: outputs may overlap (a directory inside another, a
        file named twice), and each path is listed and counted once.
        """
        if rel in self.files or rel in self.symlinks or rel in self.directories:
            return
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError as err:
            self.failed(rel, err)
            return
        if stat.S_ISLNK(st.st_mode):
            self._add_symlink(rel, dfd, name)
        elif stat.S_ISREG(st.st_mode) and want != "directory":
            self._add_file(rel, dfd, name, st, size=size)
        elif stat.S_ISDIR(st.st_mode) and want != "file":
            self._add_directory(rel, dfd, name, size=size)
        # sockets, fifos and devices are not outputs

    def _add_symlink(self, rel: str, dfd: int, name: str) -> None:
        try:
            target = os.readlink(name, dir_fd=dfd)
        except OSError as err:
            self.failed(rel, err)
            return
        size = self._utf8_size(rel, target=target)
        if size is not None:
            self._listed(size + _ENTRY_BYTES)
            self.symlinks[rel] = OutputSymlink(rel, target)

    def _add_file(self, rel: str, dfd: int, name: str, st: os.stat_result, *, size: int) -> None:
        """Store the file once per inode (hard links share the digest and count their bytes once);
        the caps are checked before the store does any work."""
        inode = (st.st_dev, st.st_ino)
        digest = self.adopted.get(inode)
        counted = 0 if digest is not None else st.st_size
        self._count_bytes(rel, counted)
        self._listed(size + _ENTRY_BYTES + _FILE_BYTES)
        if digest is None:
            try:
                digest = self._adopt(name, dfd)
            except OSError as err:
                self._uncount(counted, size + _ENTRY_BYTES + _FILE_BYTES)
                self.failed(rel, err)
                return
            except ResourceExhaustedError as err:  # the store is full: name the output by its path
                raise ResourceExhaustedError(f"output {rel!r}: {err}") from err
            except InvalidRequestError:  # replaced by something else since it was looked at
                self._uncount(counted, size + _ENTRY_BYTES + _FILE_BYTES)
                self.problem(rel, "changed while it was collected")
                return
            self.adopted[inode] = digest
            self._count_bytes(rel, digest.size - counted)  # it grew since it was looked at
        self.files[rel] = OutputFile(rel, digest, bool(st.st_mode & 0o111))

    def _adopt(self, name: str, dfd: int) -> Digest:
        """The store's digest of ``name``, held by the pin when there is one."""
        return self.store.adopt_file(name, dir_fd=dfd, pin=self.pin)

    def _count_bytes(self, rel: str, size: int) -> None:
        self.total += size
        if self.total > self.max_bytes:
            raise OutputLimitExceeded(
                f"outputs exceed execution.max_output_bytes ({self.max_bytes} bytes) at {_printable(rel)!r}"
            )

    def _uncount(self, size: int, listing: int) -> None:
        """Take back what an output that was not collected after all had counted."""
        self.total -= size
        self.listing -= listing

    def _add_directory(self, rel: str, dfd: int, name: str, *, size: int) -> None:
        """List the directory and everything under it; one that cannot be read is a problem and
        is left out whole (an empty listing would claim it is empty). A walk of its own, by
        descriptors, rather than ``fs.directories``: every entry is checked against the result's
        caps as it is listed, and a tree the command left behind is not trusted by path."""
        try:
            sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=dfd)
        except OSError as err:
            self.failed(rel, err)
            return
        try:
            try:
                entries = sorted(os.listdir(sub))
            except OSError as err:
                self.failed(rel, err)
                return
            self._listed(size + _ENTRY_BYTES)
            self.directories.add(rel)
            for entry in entries:
                child = f"{rel}/{entry}"
                child_size = self._utf8_size(child)
                if child_size is None:
                    continue
                problem = output_path_problem(child, child_size)
                if problem:
                    raise OutputLimitExceeded(problem)
                self._add(child, sub, entry, size=child_size, want="any")
        finally:
            os.close(sub)


def collect_outputs(
    root: Path,
    *,
    output_files: tuple[str, ...],
    output_directories: tuple[str, ...],
    output_paths: tuple[str, ...] = (),
    store: BlobStore,
    max_bytes: int,
    pin: BlobPin | None = None,
) -> OutputManifest:
    """Return the manifest of every declared output that exists, each path once.

    ``output_files`` must be files (or symlinks), ``output_directories`` directories (or
    symlinks); an ``output_paths`` entry may be either, whichever the command made.

    Raises OutputLimitExceeded when the outputs hold more than ``max_bytes`` file bytes (each
    inode counted once) or would make a result larger than MAX_LISTING_BYTES, and lets the
    store's ResourceExhaustedError through; never raises OSError. A missing output is simply
    absent; one that exists but cannot be read or stored is named in ``problems`` and the rest
    is still collected; a missing action root gives an empty manifest with one problem.
    ``pin`` is handed to the store with every file it takes, so none is evicted before the
    result is sent.
    """
    collector = _Collector(store=store, max_bytes=max_bytes, pin=pin)
    try:
        root_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        collector.problem(".", f"the action directory cannot be opened ({_reason(err)})")
        return collector.manifest()
    try:
        for rel in output_files:
            collector.add_declared(root_fd, rel, want="file")
        for rel in output_directories:
            collector.add_declared(root_fd, rel, want="directory")
        for rel in output_paths:
            collector.add_declared(root_fd, rel, want="any")
    finally:
        os.close(root_fd)
    return collector.manifest()
