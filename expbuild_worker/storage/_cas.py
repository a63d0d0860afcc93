"""An on-disk, sha256-addressed blob store, bounded by bytes on disk, with pins for blobs in use."""

from __future__ import annotations

import errno
import hashlib
import heapq
import io
import itertools
import logging
import os
import shutil
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from expbuild_worker.errors import (
    InternalError,
    InvalidRequestError,
    MissingBlobsError,
    NotFoundError,
    ResourceExhaustedError,
    name_some,
)
from expbuild_worker.model import Digest
from expbuild_worker.storage._index import BlobIndex, IndexEntry
from expbuild_worker.storage._protocol import BlobPin, BlobStore

_log = logging.getLogger(__name__)

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
_READ_CHUNK = 1 << 20
_EVICT_TO = 0.9
"""Eviction frees down to this fraction of the bound, so it runs in batches, not per new blob."""


def check_digest(digest: Digest, field: str) -> None:
    """Raise InvalidRequestError naming ``field`` unless ``digest`` is well formed."""
    if not _is_sha256(digest.sha256):
        raise InvalidRequestError(
            f"{field}.sha256: expected 64 lower-case hex characters, got {digest.sha256!r}"
        )
    if digest.size < 0:
        raise InvalidRequestError(f"{field}.size_bytes: expected zero or more, got {digest.size}")


def _is_sha256(name: str) -> bool:
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _is_empty(digest: Digest) -> bool:
    return digest.size == 0 and digest.sha256 == EMPTY_SHA256


class BlobWriter:
    """Receives one blob's bytes into a private temporary file; ``commit`` verifies and publishes it.

    Concurrent writers of the same digest each write their own file; publishing is atomic and
    the first one wins, later ones find the blob stored and drop their copy. ``received`` is
    where an interrupted upload resumes: a front door may keep the writer between streams.
    A writer is used by one thread at a time.
    """

    def __init__(self, *, store: ContentAddressedStore, digest: Digest) -> None:
        self._store = store
        self.digest = digest
        self._hash = hashlib.sha256()
        self.received = 0
        self._tmp = store.temp_path()
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        """Append ``data``; InvalidRequestError (and the writer aborted) past the digest's size."""
        if self.received + len(data) > self.digest.size:
            self.abort()
            raise InvalidRequestError(
                f"blob {self.digest}: received more than the digest's {self.digest.size} bytes"
            )
        self._fh.write(data)
        self._hash.update(data)
        self.received += len(data)

    def commit(self) -> Digest:
        """Verify size and hash, then publish.

        InvalidRequestError on a mismatch; ResourceExhaustedError when pinned blobs leave no
        room. Either way nothing is stored and the temporary file is gone.
        """
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
        """Drop what was received. Idempotent."""
        if not self._fh.closed:
            self._fh.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Abort unless committed: a writer left by an exception leaves no temporary file."""
        if exc_type is not None or not self._fh.closed:
            self.abort()


class StorePin:
    """The ``BlobPin`` of a ContentAddressedStore. Its state is guarded by the store's lock."""

    def __init__(self, store: ContentAddressedStore) -> None:
        self._store = store
        self._held: dict[Digest, None] = {}
        self._released = False
        self._deadline: float | None = None

    @property
    def digests(self) -> tuple[Digest, ...]:
        with self._store._lock:
            return tuple(self._held)

    def add(self, digest: Digest) -> None:
        self._store._pin_into(self, (digest,))

    def release(self) -> None:
        with self._store._lock:
            self._store._release_locked(self)

    def release_after(self, seconds: float) -> None:
        self._store._release_at(self, seconds)

    def __enter__(self) -> StorePin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class ContentAddressedStore:
    """Blobs live at ``root/blobs/<first two hex>/<sha256>``; writes go through ``root/tmp``.

    Bounded by bytes on disk (512-byte ``st_blocks``, so a sparse file costs what it occupies):
    when a new blob would take the total past ``max_bytes``, the least recently used unpinned
    blobs are evicted until the total with it is at most 90 % of the bound. A pinned blob is
    never evicted; when the pinned ones leave no room, the new blob is refused with
    ResourceExhaustedError and not stored. Blobs are read-only so a stray writer cannot
    change content under its name. Input staging copies out of the store (an action must
    never be able to change a stored blob), output collection links into it.

    The index (size, bytes on disk, last use, pins) lives in memory; ``contains``,
    ``find_missing`` and ``pin`` answer from it without touching the disk. The constructor
    rebuilds it by scanning the blob directory (mtime is the last use; reads and re-uploads
    refresh mtime so the order survives a restart) and removes half-written files of a
    previous run: construct the store on a thread, not on the event loop.

    Threads: every method may be called from any thread at once. All but ``contains``,
    ``find_missing``, ``pin`` and the pin's methods do disk I/O (hashing, copying, reading)
    and must not run on the event loop; iterate ``open_blob`` on a thread too. One lock
    guards the index together with the renames that publish and evict blobs, so the index
    never disagrees with the directory; no data is read, written or hashed under it.

    Every pin must be released (``release``, ``release_after`` or a ``with`` block): one that
    is dropped holds its blobs until the worker restarts. ``clock`` (monotonic seconds) times
    ``release_after``; tests pass a controllable one.
    """

    def __init__(self, *, root: Path, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._clock = clock
        self._blobs = root / "blobs"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._index = BlobIndex()
        self._deadlines: list[tuple[float, int, StorePin]] = []  # a heap: release_after, soonest first
        self._sequence = itertools.count()
        self._blobs.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)  # half-written blobs of a previous run
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    # -- sizes -----------------------------------------------------------------------------

    @property
    def total_bytes(self) -> int:
        """The sum of the stored blobs' sizes."""
        with self._lock:
            return self._index.size

    @property
    def size_on_disk(self) -> int:
        """Bytes the stored blobs occupy on disk: what ``max_bytes`` bounds."""
        with self._lock:
            return self._index.on_disk

    @property
    def pinned_bytes(self) -> int:
        """Bytes on disk of the blobs that are pinned (and so cannot be evicted) now."""
        with self._lock:
            self._expire_locked()
            return self._index.pinned_on_disk

    def path_of(self, digest: Digest) -> Path:
        return self._blobs / digest.sha256[:2] / digest.sha256

    def temp_path(self) -> Path:
        return self._tmp / uuid.uuid4().hex

    # -- queries and pins (memory only) ------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        with self._lock:
            return self._present_locked(digest)

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        wanted = list(digests)
        now = time.time()
        missing = []
        with self._lock:
            for d in wanted:
                if self._present_locked(d):
                    self._index.touch(d.sha256, now)
                else:
                    missing.append(d)
        return missing

    def pin(self, digests: Iterable[Digest]) -> StorePin:
        """Hold every blob (see ``BlobStore.pin``); MissingBlobsError listing the absent ones."""
        pin = StorePin(self)
        self._pin_into(pin, digests)
        return pin

    def _present_locked(self, digest: Digest) -> bool:
        if _is_empty(digest):
            return True
        entry = self._index.get(digest.sha256)
        return entry is not None and entry.size == digest.size

    def _pin_into(self, pin: StorePin, digests: Iterable[Digest]) -> None:
        wanted = list(dict.fromkeys(digests))
        with self._lock:
            self._expire_locked()  # first: the pin itself may be past its deadline
            if pin._released:
                raise ValueError("cannot add blobs to a released pin")
            missing = [d for d in wanted if not self._present_locked(d)]
            if missing:
                raise MissingBlobsError(_missing_message(missing), digests=tuple(missing))
            for d in wanted:
                self._hold_locked(pin, d)

    def _hold_locked(self, pin: StorePin, digest: Digest) -> None:
        if digest in pin._held:
            return
        pin._held[digest] = None
        if not _is_empty(digest):
            self._index.pin(digest.sha256)

    def _release_locked(self, pin: StorePin) -> None:
        if pin._released:
            return
        pin._released = True
        now = time.time()
        for d in pin._held:
            if not _is_empty(d):
                self._index.unpin(d.sha256, now)
        pin._held.clear()

    def _release_at(self, pin: StorePin, seconds: float) -> None:
        with self._lock:
            if pin._released:
                return
            if seconds <= 0:
                self._release_locked(pin)
                return
            pin._deadline = self._clock() + seconds
            heapq.heappush(self._deadlines, (pin._deadline, next(self._sequence), pin))

    def _expire_locked(self) -> None:
        """Release the pins whose ``release_after`` deadline has passed.

        Runs whenever pins matter (before eviction, pinning and counting pinned bytes), so no
        timer is needed: a pin past its deadline holds nothing anyone could be refused for.
        """
        now = self._clock()
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, _, pin = heapq.heappop(self._deadlines)
            if pin._deadline == deadline:  # else replaced by a later release_after
                self._release_locked(pin)

    def _own(self, pin: BlobPin | None) -> StorePin | None:
        if pin is None:
            return None
        if not isinstance(pin, StorePin) or pin._store is not self:
            raise ValueError("the pin was not made by this store")
        return pin

    # -- writing -----------------------------------------------------------------------------

    def writer(self, digest: Digest) -> BlobWriter:
        """A writer for ``digest``; ResourceExhaustedError up front when the blob cannot fit."""
        self._check_fits(f"blob {digest}", digest.size)
        return BlobWriter(store=self, digest=digest)

    def put_bytes(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        if digest not in self.find_missing((digest,)):  # present: counts as a use
            return digest
        w = self.writer(digest)
        w.write(data)
        w.commit()
        return digest

    def adopt_file(self, name: str, *, dir_fd: int, pin: BlobPin | None = None) -> Digest:
        """Take a finished regular file (an output) into the store, by hard link where safe.

        ``name`` is resolved in ``dir_fd`` without following a symlink. The caller guarantees
        nothing writes the file any more (the action has ended). A file with other names (a
        hard link to something outside the action, say) is copied, holes kept, never linked:
        the store's chmod must not reach a file it does not own. What is stored is exactly
        what is hashed. With ``pin`` (made by this store) the blob is pinned under the lock
        that publishes it, so it cannot be evicted before the caller sees its digest.
        """
        owned = self._own(pin)
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidRequestError(f"output {name!r} is not a regular file")
        self._check_fits(f"output {name!r}", _on_disk(st))
        tmp = self.temp_path()
        try:
            linked = False
            if st.st_nlink == 1:
                try:
                    os.link(name, tmp, src_dir_fd=dir_fd, follow_symlinks=False)
                    linked = True
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                        raise
            if not linked:
                src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
                    try:
                        _copy_sparse(src, dst)
                    finally:
                        os.close(dst)
                finally:
                    os.close(src)
            digest = _hash_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.publish(tmp, digest, pin=owned)
        return digest

    def publish(self, tmp: Path, digest: Digest, *, pin: BlobPin | None = None) -> None:
        """Move a verified temporary file into place (atomic), evicting to make room.

        The caller verified that ``tmp`` holds exactly ``digest``. ResourceExhaustedError
        when the file is larger than the bound or pinned blobs leave no room for it; the
        temporary file is gone afterwards whatever happens. With ``pin``, the blob is pinned
        under the same lock that publishes it.
        """
        owned = self._own(pin)
        retired: list[Path] = []
        try:
            if _is_empty(digest):
                if owned is not None:
                    self._pin_into(owned, (digest,))
                return
            on_disk = _on_disk(os.stat(tmp))
            if on_disk > self.max_bytes:
                raise ResourceExhaustedError(self._too_large(f"blob {digest}", on_disk))
            os.chmod(tmp, 0o444)
            with self._lock:
                retired = self._publish_locked(tmp, digest, on_disk, owned)
        finally:
            tmp.unlink(missing_ok=True)  # already renamed when published
            for path in retired:
                path.unlink(missing_ok=True)

    def _publish_locked(self, tmp: Path, digest: Digest, on_disk: int, pin: StorePin | None) -> list[Path]:
        """Publish under the lock; return the evicted files, already renamed away, to unlink."""
        self._expire_locked()  # first: the pin itself may be past its deadline
        if pin is not None and pin._released:
            raise ValueError("cannot add blobs to a released pin")
        entry = self._index.get(digest.sha256)
        if entry is not None and entry.size != digest.size:
            # A file under this name with another size is not this content: replace it.
            if entry.pins:
                raise InternalError(
                    f"blob {digest}: the store holds a pinned file of {entry.size} bytes under this "
                    "sha256 and cannot replace it now"
                )
            self._index.remove(digest.sha256)
            entry = None
        if entry is not None:  # stored meanwhile by another writer: theirs stays, this one goes
            self._index.touch(digest.sha256, time.time())
            record_use(self.path_of(digest))
            if pin is not None:
                self._hold_locked(pin, digest)
            return []
        victims = self._index.make_room(on_disk, limit=self.max_bytes, target=self._evict_target())
        if victims is None:
            raise ResourceExhaustedError(self._store_full(f"blob {digest}", on_disk))
        retired = [p for p in map(self._retire_locked, victims) if p is not None]
        final = self.path_of(digest)
        final.parent.mkdir(exist_ok=True)
        os.replace(tmp, final)
        self._index.add(digest.sha256, IndexEntry(size=digest.size, on_disk=on_disk, last_use=time.time()))
        if pin is not None:
            self._hold_locked(pin, digest)
        return retired

    def _retire_locked(self, sha256: str) -> Path | None:
        """Rename an evicted blob out of the blob directory; the caller unlinks it after the lock.

        Renaming (not unlinking) under the lock means a writer publishing the same blob
        right after cannot have its fresh file removed by this eviction; freeing the
        blocks of a large file happens outside the lock.
        """
        doomed = self.temp_path()
        try:
            os.rename(self._blobs / sha256[:2] / sha256, doomed)
        except FileNotFoundError:
            return None
        return doomed

    def _evict_target(self) -> int:
        return int(self.max_bytes * _EVICT_TO)

    def _check_fits(self, what: str, size: int) -> None:
        """Refuse up front what cannot fit now: larger than the bound, the free disk, or the room."""
        if size > self.max_bytes:
            raise ResourceExhaustedError(self._too_large(what, size))
        free = shutil.disk_usage(self._tmp).free
        if size > free:
            raise ResourceExhaustedError(
                f"{what}: {size} bytes do not fit the {free} bytes free on the store's disk"
            )
        with self._lock:
            self._expire_locked()
            if self._index.pinned_on_disk + size > self.max_bytes:
                raise ResourceExhaustedError(self._store_full(what, size))

    def _too_large(self, what: str, size: int) -> str:
        return (
            f"{what}: {size} bytes are more than the store holds ({self.max_bytes} bytes, storage.max_bytes)"
        )

    def _store_full(self, what: str, size: int) -> str:
        return (
            f"{what}: store full: {self._index.pinned_on_disk} of {self.max_bytes} bytes are pinned by "
            f"running actions and {size} more do not fit; retry when actions finish, or raise "
            "storage.max_bytes"
        )

    # -- reading -----------------------------------------------------------------------------

    def open_blob(self, digest: Digest, *, offset: int = 0, limit: int | None = None) -> Iterator[bytes]:
        """Yield ``limit`` bytes (None: all) from ``offset`` in chunks.

        Raises before returning: NotFoundError when absent, InvalidRequestError for a
        negative limit or an offset outside ``0..size``. The file is open once this returns,
        so the stream stays whole even if the blob is evicted while it is read.
        """
        if offset < 0 or offset > digest.size:
            raise InvalidRequestError(
                f"blob {digest}: offset {offset} is outside the blob (0 to {digest.size} bytes)"
            )
        if limit is not None and limit < 0:
            raise InvalidRequestError(f"blob {digest}: limit {limit} is negative")
        if _is_empty(digest):
            return iter(())
        fh = self._open(digest)
        try:
            size = os.fstat(fh.fileno()).st_size
            if size != digest.size:
                raise InternalError(f"blob {digest}: the stored file has {size} bytes")
            record_use(fh.fileno())
        except BaseException:
            fh.close()
            raise
        count = size - offset if limit is None else min(limit, size - offset)
        return _chunks(fh, offset, count)

    def copy_to(self, digest: Digest, dest: Path, *, executable: bool) -> None:
        """Create ``dest`` as a copy of the blob (holes kept), so the action cannot alter the store.

        ``dest`` is created with O_EXCL|O_NOFOLLOW: an existing file or symlink there is a
        FileExistsError, never written through. NotFoundError when the blob is absent.
        """
        mode = 0o755 if executable else 0o644
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        if _is_empty(digest):
            fd = os.open(dest, flags, mode)
            try:
                os.fchmod(fd, mode)  # the umask must not strip the execute bit
            finally:
                os.close(fd)
            return
        with self._open(digest) as fh:
            fd = os.open(dest, flags, mode)
            try:
                _copy_sparse(fh.fileno(), fd)
                os.fchmod(fd, mode)
            finally:
                os.close(fd)
            record_use(fh.fileno())

    def _open(self, digest: Digest) -> io.FileIO:
        """Open a stored blob for reading and count it as used; NotFoundError when absent."""
        with self._lock:
            entry = self._index.get(digest.sha256)
            if entry is None:
                raise NotFoundError(f"blob {digest} is not in the store")
            if entry.size != digest.size:
                raise NotFoundError(
                    f"blob {digest} is not in the store (the blob with that sha256 has {entry.size} bytes)"
                )
            self._index.touch(digest.sha256, time.time())
        path = self.path_of(digest)
        try:
            return io.FileIO(path, "r")
        except FileNotFoundError as err:
            self._forget_vanished(digest)
            raise NotFoundError(f"blob {digest} is not in the store") from err

    def _forget_vanished(self, digest: Digest) -> None:
        """Drop a blob whose file was removed behind the store's back, so the index tells the truth."""
        with self._lock:
            if not self.path_of(digest).exists() and self._index.remove(digest.sha256) is not None:
                _log.warning("blob %s vanished from the store's directory; forgotten", digest)

    # -- start-up ----------------------------------------------------------------------------

    def _rebuild_index(self) -> None:
        """Index the blobs a previous run left, oldest use first, and evict down to the bound."""
        found: list[tuple[float, str, int, int]] = []
        with os.scandir(self._blobs) as prefixes:
            for prefix in prefixes:
                if not prefix.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(prefix.path) as files:
                    for f in files:
                        if not (_is_sha256(f.name) and f.name[:2] == prefix.name):
                            continue
                        st = f.stat(follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            found.append((st.st_mtime, f.name, st.st_size, _on_disk(st)))
        found.sort()
        for mtime, sha256, size, on_disk in found:
            self._index.add(sha256, IndexEntry(size=size, on_disk=on_disk, last_use=mtime))
        victims = self._index.make_room(0, limit=self.max_bytes, target=self._evict_target()) or []
        for sha256 in victims:
            (self._blobs / sha256[:2] / sha256).unlink(missing_ok=True)
        _log.info(
            "store at %s: %d blobs, %d bytes on disk of %d (%d evicted at start)",
            self.root,
            len(self._index),
            self._index.on_disk,
            self.max_bytes,
            len(victims),
        )


if TYPE_CHECKING:  # mypy proves the store keeps the contracts
    _store_contract: type[BlobStore] = ContentAddressedStore
    _pin_contract: type[BlobPin] = StorePin


def _on_disk(st: os.stat_result) -> int:
    return st.st_blocks * 512


def _missing_message(missing: list[Digest]) -> str:
    named = name_some(missing)
    return f"{len(missing)} blob(s) are not in the worker's store and must be uploaded again: {named}"


def record_use(file: int | Path) -> None:
    """Record a use in the file's mtime (a descriptor or a path), so the least-recently-used
    order survives a restart; best effort. The action cache keeps its order the same way."""
    try:
        os.utime(file)
    except OSError as err:
        _log.debug("could not record a use of a stored file: %s", err)


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The ``(start, end)`` ranges of a file that hold data, in order; the rest are holes.

    Where the filesystem cannot tell, the whole file is one range.
    """
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError as err:
            if err.errno == errno.ENXIO:  # nothing but a hole after pos
                return
            if err.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
            start, end = pos, size
        if start >= end:
            return
        yield start, end
        pos = end


def _hash_file(path: Path) -> Digest:
    """Hash a file, feeding its holes from memory rather than reading zeros from the kernel.

    A sparse output of many GiB then costs hashing time only, not reading it too.
    """
    sha = hashlib.sha256()
    zeros = memoryview(bytes(_READ_CHUNK))
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        for start, end in [*_data_ranges(fd, size), (size, size)]:
            while pos < start:  # the hole before this range
                n = min(_READ_CHUNK, start - pos)
                sha.update(zeros[:n])
                pos += n
            while pos < end:
                data = os.pread(fd, min(_READ_CHUNK, end - pos), pos)
                if not data:
                    raise InternalError(f"{path.name} shrank while it was hashed")
                sha.update(data)
                pos += len(data)
    finally:
        os.close(fd)
    return Digest(sha.hexdigest(), size)


def _copy_sparse(src: int, dst: int) -> None:
    """Copy a whole file between descriptors, leaving holes where the source has them.

    Without this a sparse output copied into the store (or staged out of it) would occupy
    its full size on disk, while the bound counts what blobs occupy.
    """
    size = os.fstat(src).st_size
    for start, end in _data_ranges(src, size):
        _copy_range(src, dst, start, end)
    os.ftruncate(dst, size)


def _copy_range(src: int, dst: int, start: int, end: int) -> None:
    while start < end:
        data = os.pread(src, min(_READ_CHUNK, end - start), start)
        if not data:
            return
        view = memoryview(data)
        offset = start
        while view:
            written = os.pwrite(dst, view, offset)
            view = view[written:]
            offset += written
        start += len(data)


def _chunks(fh: io.FileIO, offset: int, count: int) -> Iterator[bytes]:
    with fh:
        fd = fh.fileno()
        while count > 0:
            chunk = os.pread(fd, min(_READ_CHUNK, count), offset)
            if not chunk:
                return
            offset += len(chunk)
            count -= len(chunk)
            yield chunk
