"""Archive I/O for daemons that do not share our filesystem: pack the action root, unpack outputs safely."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import posixpath
import stat
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from expbuild_worker.errors import InternalError, OutputLimitExceeded
from expbuild_worker.fs import make_dirs, remove_tree
from expbuild_worker.validation import output_path_problem

_COPY_CHUNK = 1 << 20


class UnsafeArchiveError(InternalError):
    """A tar member from the daemon would land outside the action root or through a symlink."""


def pack_root(root: Path, *, arcname: str, dir_owner: tuple[int, int] | None) -> IO[bytes]:
    """A tar of ``root`` (as ``arcname``) in a temporary file, positioned at its start.

    Symlinks are packed as symlinks. Directories get ``dir_owner`` (the command's user) so it
    can create outputs; without a numeric owner they are made writable by everyone instead.
    Files keep their owner and mode: the command reads its inputs but cannot change them in
    place. A temporary file rather than memory, because inputs can be large.
    """

    def adjust(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uname = info.gname = ""
        if info.isdir():
            if dir_owner is not None:
                info.uid, info.gid = dir_owner
            else:
                info.mode |= 0o777
        return info

    spool = tempfile.TemporaryFile()  # noqa: SIM115 - handed to the caller, who closes it
    try:
        with tarfile.open(fileobj=spool, mode="w", format=tarfile.PAX_FORMAT) as tar:
            tar.add(str(root), arcname=arcname, recursive=True, filter=adjust)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    return spool


class _ChunkReader(io.RawIOBase):
    """A read-only raw file over an iterator of byte chunks (the daemon's archive stream)."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        super().__init__()
        self._chunks: Iterator[bytes] = iter(chunks)
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = memoryview(chunk)
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _checked_parent(root: Path, rel_parent: str) -> Path:
    """``root / rel_parent``, creating missing directories, refusing any symlink on the way."""
    try:
        return make_dirs(root, rel_parent)
    except (ValueError, NotADirectoryError) as err:
        raise UnsafeArchiveError(f"{rel_parent!r}: {err}") from err


def clear_output(root: Path, output_path: str) -> bool:
    """Remove what is at ``output_path`` under ``root`` without following symlinks; False if a
    parent is not a real directory (then nothing is touched)."""
    parent_rel, name = posixpath.split(output_path)
    try:
        parent = _checked_parent(root, parent_rel)
    except UnsafeArchiveError:
        return False
    _unlink_if_present(parent / name)
    return True


def distinct_outputs(output_paths: Iterable[str]) -> list[str]:
    """Each output once, in a stable order: duplicates and paths inside another listed output
    are dropped, since the archive of the outer one holds them (copying them again would count
    their bytes twice against the cap)."""
    kept: set[str] = set()
    for path in sorted(set(output_paths), key=lambda p: (p.count("/"), p)):
        parts = path.split("/")
        if not any("/".join(parts[:i]) in kept for i in range(1, len(parts))):
            kept.add(path)
    return sorted(kept)


def unpack_output(
    chunks: Iterable[bytes], *, root: Path, output_path: str, max_bytes: int | None = None
) -> int:
    """Extract the daemon's archive of ``output_path`` into ``root``; returns the file bytes written.

    The archive's top member is the output's base name. Every member must stay under it;
    parents on the host must be real directories; symlinks are created as symlinks and never
    followed; hard links are re-created only to members already extracted (their bytes count
    once); device nodes and FIFOs are skipped. Raises UnsafeArchiveError for a member that
    breaks these rules, and OutputLimitExceeded at the first member nested deeper or named longer
    than a result may carry (before unpacking it: a deep tree would otherwise take minutes) or
    that would take the file bytes past ``max_bytes`` (judged by its tar header before any of
    it is written, and counted again as it is written: a sparse terabyte must never reach the
    disk). On any failure the stream is closed unread and what was unpacked of this output is
    removed.
    """
    parent_rel, name = posixpath.split(output_path)
    parent = _checked_parent(root, parent_rel)
    try:
        return _unpack(chunks, parent=parent, parent_rel=parent_rel, name=name, max_bytes=max_bytes)
    except BaseException:
        close = getattr(chunks, "close", None)
        if close is not None:
            with contextlib.suppress(Exception):
                close()
        with contextlib.suppress(OSError):
            remove_tree(parent / name)
        raise


def _unpack(
    chunks: Iterable[bytes], *, parent: Path, parent_rel: str, name: str, max_bytes: int | None
) -> int:
    output_path = posixpath.join(parent_rel, name)
    written = 0

    def check_room(size: int, member: str) -> None:
        if max_bytes is not None and written + size > max_bytes:
            raise OutputLimitExceeded(
                f"outputs exceed execution.max_output_bytes at {member!r}: more than the "
                f"{max_bytes} bytes {output_path!r} may take"
            )

    stream = io.BufferedReader(_ChunkReader(chunks), buffer_size=_COPY_CHUNK)
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            member_name = posixpath.normpath(member.name)
            if member_name != name and not member_name.startswith(name + "/"):
                raise UnsafeArchiveError(
                    f"archive of {output_path!r} holds unexpected member {member.name!r}"
                )
            if member_name.startswith("/") or ".." in member_name.split("/"):
                raise UnsafeArchiveError(f"archive of {output_path!r} holds unsafe member {member.name!r}")
            full = posixpath.join(parent_rel, member_name)
            problem = output_path_problem(full, len(full.encode(errors="surrogateescape")))
            if problem:
                raise OutputLimitExceeded(problem)
            if member.isfile():
                check_room(member.size, full)
            sub_parent, base = posixpath.split(member_name)
            dest_dir = _checked_parent(parent, sub_parent)
            dest = dest_dir / base
            if member.isdir():
                try:
                    st = os.lstat(dest)
                except FileNotFoundError:
                    os.mkdir(dest, 0o755)
                else:
                    if not stat.S_ISDIR(st.st_mode):
                        raise UnsafeArchiveError(f"{member.name!r} would replace a non-directory")
                os.chmod(dest, member.mode & 0o777)
                continue
            _unlink_if_present(dest)
            if member.issym():
                os.symlink(member.linkname, dest)
            elif member.islnk():
                source_name = posixpath.normpath(member.linkname)
                if source_name != name and not source_name.startswith(name + "/"):
                    raise UnsafeArchiveError(f"hard link {member.name!r} points outside the output")
                src_parent, src_base = posixpath.split(source_name)
                source = _checked_parent(parent, src_parent) / src_base
                os.link(source, dest, follow_symlinks=False)
            elif member.isfile():
                source_file = tar.extractfile(member)
                assert source_file is not None
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, member.mode & 0o777)
                with os.fdopen(fd, "wb") as out:
                    while block := source_file.read(_COPY_CHUNK):
                        check_room(len(block), full)
                        out.write(block)
                        written += len(block)
                os.chmod(dest, member.mode & 0o777)
    return written


def _unlink_if_present(path: Path) -> None:
    """Remove whatever is at ``path`` (a whole tree for a directory) without following symlinks."""
    if not remove_tree(path):
        raise OSError(errno.ENOTEMPTY, "could not remove what is in the way", str(path))
