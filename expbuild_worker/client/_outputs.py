"""Writes an action's outputs under a local directory, refusing any path that would escape it."""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from expbuild_worker.api.v1 import worker_pb2 as pb
from expbuild_worker.errors import WorkerError
from expbuild_worker.validation import is_valid_relative_path

__all__ = ["BlobReader", "OutputError", "OutputWriter"]

BlobReader = Callable[[pb.Digest], Iterable[bytes]]
"""Fetches a blob's bytes in order (for outputs whose contents were not streamed)."""


class OutputError(WorkerError):
    """An output cannot be written safely, or its bytes do not match the result's manifest."""


class _OpenFile:
    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self.fd = fd
        self.size = 0
        self.sha = hashlib.sha256()


class OutputWriter:
    """Reassembles OutputFileChunks into files under ``destination`` and applies the result's manifest.

    Feed every ``output_chunk`` event to :meth:`write` and the result to :meth:`finish`. Paths
    must be normalised and relative; every parent is walked with ``O_NOFOLLOW``, so an existing
    symlink (local or sent by the worker) is never written through. Existing files at an
    output's path are replaced; an existing directory there is an error. ``finish`` checks each
    file's size and sha256 against the manifest and removes a file that does not match.
    """

    def __init__(self, *, destination: Path) -> None:
        self._destination = destination
        self._current: _OpenFile | None = None
        self._written: dict[str, tuple[int, str]] = {}

    def write(self, chunk: pb.OutputFileChunk) -> None:
        """Append one chunk; chunks of a file arrive contiguous and in order."""
        current = self._current
        if current is None or current.path != chunk.path:
            self._close_current()
            if chunk.path in self._written:
                raise OutputError(f"output {chunk.path!r}: chunks arrived after the file was complete")
            if chunk.offset != 0:
                raise OutputError(f"output {chunk.path!r}: first chunk starts at byte {chunk.offset}, not 0")
            current = self._current = _OpenFile(chunk.path, self._create_file(chunk.path))
        if chunk.offset != current.size:
            raise OutputError(
                f"output {chunk.path!r}: chunk at offset {chunk.offset} does not follow byte {current.size}"
            )
        view = memoryview(chunk.data)
        while view:
            written = os.write(current.fd, view)
            view = view[written:]
        current.sha.update(chunk.data)
        current.size += len(chunk.data)

    def finish(self, result: pb.ExecutionResult, *, read_blob: BlobReader | None = None) -> list[str]:
        """Apply the manifest: directories, files (verified), exec bits, then symlinks.

        Files listed with no streamed content are created empty when their size is 0, fetched
        with ``read_blob`` otherwise (for ``omit_output_contents``); without ``read_blob`` that
        is an OutputError. Returns the relative paths materialised, in manifest order.
        """
        self._close_current()
        done: list[str] = []
        listed = {f.path for f in result.output_files}
        for path in self._written:
            if path not in listed:
                self._remove(path)
                raise OutputError(f"output {path!r}: content arrived but the result does not list it")
        for d in result.output_directories:
            self._make_parents(d.path + "/x")
            done.append(d.path)
        for f in result.output_files:
            if f.path not in self._written:
                self._fetch(f, read_blob)
            self._verify(f)
            self._set_mode(f.path, 0o755 if f.is_executable else 0o644)
            done.append(f.path)
        for link in result.output_symlinks:
            parent, name = self._open_parent(link.path)
            try:
                self._clear(parent, name, link.path)
                os.symlink(link.target, name, dir_fd=parent)
            finally:
                os.close(parent)
            done.append(link.path)
        return done

    def close(self) -> None:
        """Close any file still open (after an error or an abandoned stream)."""
        self._close_current()

    def _fetch(self, f: pb.OutputFile, read_blob: BlobReader | None) -> None:
        if f.digest.size_bytes == 0:
            fd = self._create_file(f.path)
            os.close(fd)
            self._written[f.path] = (0, hashlib.sha256().hexdigest())
            return
        if read_blob is None:
            raise OutputError(f"output {f.path!r}: no content received for its {f.digest.size_bytes} bytes")
        offset = 0
        for data in read_blob(f.digest):
            self.write(pb.OutputFileChunk(path=f.path, offset=offset, data=data))
            offset += len(data)
        if self._current is None:  # an empty read of a non-empty blob: let _verify report it
            os.close(self._create_file(f.path))
            self._written[f.path] = (0, hashlib.sha256().hexdigest())
        self._close_current()

    def _verify(self, f: pb.OutputFile) -> None:
        size, sha = self._written[f.path]
        if size != f.digest.size_bytes or sha != f.digest.sha256:
            self._remove(f.path)
            raise OutputError(
                f"output {f.path!r}: received {size} bytes with sha256 {sha}, "
                f"but the result says {f.digest.size_bytes} bytes with sha256 {f.digest.sha256}"
            )

    def _close_current(self) -> None:
        current, self._current = self._current, None
        if current is not None:
            os.close(current.fd)
            self._written[current.path] = (current.size, current.sha.hexdigest())

    def _open_parent(self, path: str) -> tuple[int, str]:
        """Open the directory that holds ``path`` (creating it), never following a symlink."""
        if not is_valid_relative_path(path):
            raise OutputError(f"output {path!r}: not a normalised relative path; refusing to write it")
        *parents, name = path.split("/")
        fd = os.open(self._destination, os.O_RDONLY | os.O_DIRECTORY)
        walked = []
        try:
            for part in parents:
                walked.append(part)
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o755, dir_fd=fd)
                try:
                    nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as err:
                    raise OutputError(
                        f"output {path!r}: {'/'.join(walked)!r} under {self._destination} is not a "
                        f"directory (a symlink or a file); refusing to write through it"
                    ) from err
                os.close(fd)
                fd = nxt
        except BaseException:
            os.close(fd)
            raise
        return fd, name

    def _make_parents(self, path: str) -> None:
        fd, _ = self._open_parent(path)
        os.close(fd)

    def _clear(self, parent: int, name: str, path: str) -> None:
        """Remove a non-directory already at ``name`` so the output replaces it."""
        try:
            st = os.stat(name, dir_fd=parent, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"output {path!r}: a directory is in the way under {self._destination}")
        os.unlink(name, dir_fd=parent)

    def _create_file(self, path: str) -> int:
        parent, name = self._open_parent(path)
        try:
            self._clear(parent, name, path)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return os.open(name, flags, 0o644, dir_fd=parent)
        finally:
            os.close(parent)

    def _set_mode(self, path: str, mode: int) -> None:
        parent, name = self._open_parent(path)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=parent)
        finally:
            os.close(parent)
        try:
            os.fchmod(fd, mode)
        finally:
            os.close(fd)

    def _remove(self, path: str) -> None:
        parent, name = self._open_parent(path)
        try:
            os.unlink(name, dir_fd=parent)
        except FileNotFoundError:
            pass
        finally:
            os.close(parent)
