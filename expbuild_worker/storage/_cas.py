"""An on-disk, size-bounded, sha256-addressed blob store that is safe for concurrent writers."""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

from expbuild_worker.errors import InvalidRequestError, NotFoundError, ResourceExhaustedError
from expbuild_worker.model import Digest

_log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_READ_CHUNK = 1 << 20


def check_digest(digest: Digest, field: str) -> None:
    """Raise InvalidRequestError naming ``field`` unless ``digest`` is well formed."""
    if len(digest.sha256) != 64 or any(c not in "0123456789abcdef" for c in digest.sha256):
        raise InvalidRequestError(
            f"{field}.sha256: expected 64 lower-case hex characters, got {digest.sha256!r}"
        )
    if digest.size < 0:
        raise InvalidRequestError(f"{field}.size_bytes: expected zero or more, got {digest.size}")


class BlobWriter:
    """Receives one blob's bytes into a private temporary file; ``commit`` verifies and publishes it.

    Concurrent writers of the same digest each write their own file; the rename that
    publishes is atomic, and identical content makes the last rename harmless.
    """

    def __init__(self, *, store: ContentAddressedStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self._hash = hashlib.sha256()
        self.received = 0
        self._tmp = store.temp_path()
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        if self.received + len(data) > self.digest.size:
            self.abort()
            raise InvalidRequestError(
                f"blob {self.digest}: received more than the digest's {self.digest.size} bytes"
            )
        self._fh.write(data)
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> Digest:
        """Verify size and hash, then publish; raises InvalidRequestError on a mismatch."""
        self._fh.close()
        actual = Digest(self._hash.hexdigest(), self.received)
        if actual != self.digest:
            self._tmp.unlink(missing_ok=True)
            raise InvalidRequestError(
                f"blob {self.digest}: content does not match its digest (got sha256 {actual.sha256}, "
                f"{actual.size} bytes)"
            )
        self._store.publish(self._tmp, self.digest)
        return self.digest

    def abort(self) -> None:
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)


class ContentAddressedStore:
    """Blobs live at ``root/blobs/<first two hex>/<sha256>``; writes go through ``root/tmp``.

    Bounded: when the total exceeds ``max_bytes`` the least recently used blobs are evicted
    until the total is back under 90 % of it. Blobs are made read-only so a stray writer
    cannot change content under its name. Input staging copies out of the store (an action
    must never be able to change a stored blob), output collection links into it.
    """

    def __init__(self, *, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)  # half-written blobs of a previous run
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._total = sum(p.stat().st_size for p in self._blobs.glob("*/*"))

    @property
    def total_bytes(self) -> int:
        return self._total

    def path_of(self, digest: Digest) -> Path:
        return self._blobs / digest.sha256[:2] / digest.sha256

    def temp_path(self) -> Path:
        return self._tmp / uuid.uuid4().hex

    def contains(self, digest: Digest) -> bool:
        if digest.size == 0 and digest.sha256 == EMPTY_SHA256:
            return True
        try:
            st = self.path_of(digest).stat()
        except FileNotFoundError:
            return False
        return st.st_size == digest.size

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        return [d for d in digests if not self.contains(d)]

    def writer(self, digest: Digest) -> BlobWriter:
        """A writer for ``digest``; ResourceExhaustedError up front when the blob cannot fit."""
        self._check_fits(digest)
        return BlobWriter(store=self, digest=digest)

    def _too_large(self, what: object, size: int) -> str:
        return (
            f"{what}: {size} bytes are more than the store holds ({self.max_bytes} bytes, storage.max_bytes)"
        )

    def _check_fits(self, digest: Digest) -> None:
        if digest.size > self.max_bytes:
            raise ResourceExhaustedError(self._too_large(f"blob {digest}", digest.size))
        free = shutil.disk_usage(self._tmp).free
        if digest.size > free:
            raise ResourceExhaustedError(
                f"blob {digest}: {digest.size} bytes do not fit the {free} bytes free on the store's disk"
            )

    def put_bytes(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        if not self.contains(digest):
            w = self.writer(digest)
            w.write(data)
            w.commit()
        return digest

    def adopt_file(self, name: str, *, dir_fd: int) -> Digest:
        """Take a finished regular file (an output) into the store, by hard link where safe.

        ``name`` is resolved in ``dir_fd`` without following a symlink. The caller guarantees
        nothing writes the file any more (the action has ended). A file with other names (a
        hard link to something outside the action, say) is copied, never linked: the store's
        chmod must not reach a file it does not own. What is stored is exactly what is hashed.
        """
        tmp = self.temp_path()
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequestError(f"output {name!r} is not a regular file")
        if st.st_size > self.max_bytes:
            raise ResourceExhaustedError(self._too_large(name, st.st_size))
        linked = False
        if st.st_nlink == 1:
            try:
                os.link(name, tmp, src_dir_fd=dir_fd, follow_symlinks=False)
                linked = True
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
        if not linked:
            src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            try:
                with open(src, "rb", closefd=False) as fin, open(tmp, "wb") as fout:
                    shutil.copyfileobj(fin, fout, _READ_CHUNK)
            finally:
                os.close(src)
        digest = Digest.of_file(tmp)
        self.publish(tmp, digest)
        return digest

    def publish(self, tmp: Path, digest: Digest) -> None:
        """Move a verified temporary file into place (atomic), then evict if over the bound."""
        if digest.size == 0 and digest.sha256 == EMPTY_SHA256:
            tmp.unlink(missing_ok=True)
            return
        if digest.size > self.max_bytes:
            tmp.unlink(missing_ok=True)
            raise ResourceExhaustedError(self._too_large(f"blob {digest}", digest.size))
        final = self.path_of(digest)
        os.chmod(tmp, 0o444)
        # Check, rename and count under one lock: two writers finishing the same blob at once
        # must count it once.
        with self._lock:
            if final.exists():
                tmp.unlink(missing_ok=True)
                os.utime(final)
                return
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            self._total += digest.size
            over = self._total > self.max_bytes
        if over:
            self._evict(keep=digest)

    def open_blob(self, digest: Digest) -> Iterator[bytes]:
        """Yield the blob's bytes in chunks; raises NotFoundError when absent."""
        if digest.size == 0 and digest.sha256 == EMPTY_SHA256:
            return iter(())
        path = self.path_of(digest)
        try:
            fh = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the generator
        except FileNotFoundError as err:
            raise NotFoundError(f"blob {digest} is not in the store") from err
        size = os.fstat(fh.fileno()).st_size
        if size != digest.size:
            fh.close()
            raise NotFoundError(
                f"blob {digest} is not in the store (the blob with that sha256 has {size} bytes)"
            )
        os.utime(path)
        return _chunks(fh)

    def copy_to(self, digest: Digest, dest: Path, *, executable: bool) -> None:
        """Materialise a blob as a fresh file (a copy, so the action cannot alter the store)."""
        mode = 0o755 if executable else 0o644
        if digest.size == 0 and digest.sha256 == EMPTY_SHA256:
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
            os.close(fd)
        else:
            src = self.path_of(digest)
            try:
                shutil.copyfile(src, dest, follow_symlinks=False)
            except FileNotFoundError as err:
                if not src.exists():
                    raise NotFoundError(f"blob {digest} is not in the store") from err
                raise
            os.utime(src)
        os.chmod(dest, mode)

    def _evict(self, *, keep: Digest) -> None:
        """Drop least recently used blobs until the total is under 90 % of the bound."""
        entries = []
        for p in self._blobs.glob("*/*"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        entries.sort()
        target = int(self.max_bytes * 0.9)
        keep_path = self.path_of(keep)
        for _, size, p in entries:
            with self._lock:
                if self._total <= target:
                    return
            if p == keep_path:
                continue
            try:
                p.unlink()
            except FileNotFoundError:
                continue
            with self._lock:
                self._total -= size
        with self._lock:
            if self._total > self.max_bytes:  # writers finishing at once; the next one evicts again
                _log.warning(
                    "content-addressed store holds %d bytes, over its bound of %d",
                    self._total,
                    self.max_bytes,
                )


def _chunks(fh: io.FileIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(_READ_CHUNK):
            yield chunk
