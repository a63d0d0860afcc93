"""A persistent, bounded map from an action's digest to the bytes of its cached result."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from pathlib import Path

from expbuild_worker.errors import ResourceExhaustedError
from expbuild_worker.model import Digest
from expbuild_worker.storage._cas import record_use

_log = logging.getLogger(__name__)

_CHECKSUM = 32
"""Each entry file starts with the SHA-256 of its value: a file cut short by a crash reads as absent."""
_ENTRY_NAME = re.compile(r"^([0-9a-f]{64})-([0-9]+)$")


class ActionCache:
    """Action digest → opaque value bytes (a serialized result; the front door parses it).

    Entries live one per file at ``root/entries/<first two hex>/<sha256>-<size>``, written to
    ``root/tmp`` and renamed into place, so a reader sees an old value or a new one, never half
    of one; each file carries a checksum, so one cut short by a crash is dropped, not served.
    The cache survives restarts: the constructor rebuilds its index from the directory (file
    mtime is the last use, refreshed on every hit, so the LRU order survives too).

    Bounded by ``max_entries`` and ``max_bytes`` (the sum of the values' sizes): a ``put``
    that takes either past its bound evicts the least recently used entries first. A value
    larger than ``max_bytes`` by itself is refused with ResourceExhaustedError.

    Threads: every method may be called from any thread at once. All but ``__len__`` and
    ``total_bytes`` touch the disk and must not run on the event loop (the constructor
    included). One lock guards the index together with the renames and unlinks that change
    the directory, so the two never disagree; values are read and written outside it.
    """

    def __init__(self, *, root: Path, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("an action cache needs room for at least one entry and one byte")
        self.root = root
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries = root / "entries"
        self._tmp = root / "tmp"
        self._lock = threading.Lock()
        self._index: OrderedDict[Digest, int] = OrderedDict()  # value sizes, least recently used first
        self._bytes = 0
        self._entries.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp, ignore_errors=True)  # half-written entries of a previous run
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._rebuild_index()

    def __len__(self) -> int:
        with self._lock:
            return len(self._index)

    @property
    def total_bytes(self) -> int:
        """The sum of the stored values' sizes: what ``max_bytes`` bounds."""
        with self._lock:
            return self._bytes

    def get(self, key: Digest) -> bytes | None:
        """The value stored for ``key``, or None. A hit counts as a use (LRU)."""
        with self._lock:
            if key not in self._index:
                return None
            self._index.move_to_end(key)
        path = self._path_of(key)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
                record_use(fh.fileno())
        except FileNotFoundError:  # evicted or replaced since the lookup: a miss
            return None
        value = data[_CHECKSUM:]
        if len(data) < _CHECKSUM or hashlib.sha256(value).digest() != data[:_CHECKSUM]:
            _log.warning("action cache entry %s is damaged; dropped", key)
            self._drop(key, path)
            return None
        return value

    def put(self, key: Digest, value: bytes) -> None:
        """Store ``value`` for ``key``, replacing any earlier one, evicting LRU entries to fit.

        ResourceExhaustedError when the value alone is larger than ``max_bytes``.
        """
        if len(value) > self.max_bytes:
            raise ResourceExhaustedError(
                f"action result for {key}: {len(value)} bytes are more than the action cache holds "
                f"({self.max_bytes} bytes)"
            )
        tmp = self._tmp / uuid.uuid4().hex
        try:
            with open(tmp, "wb") as fh:
                fh.write(hashlib.sha256(value).digest())
                fh.write(value)
            final = self._path_of(key)
            final.parent.mkdir(exist_ok=True)
            with self._lock:
                os.replace(tmp, final)
                self._bytes -= self._index.pop(key, 0)
                self._index[key] = len(value)
                self._bytes += len(value)
                self._evict_locked()
        finally:
            tmp.unlink(missing_ok=True)

    def remove(self, key: Digest) -> bool:
        """Forget ``key``'s entry; whether there was one."""
        with self._lock:
            if key not in self._index:
                return False
            self._bytes -= self._index.pop(key)
            self._path_of(key).unlink(missing_ok=True)
            return True

    def _drop(self, key: Digest, path: Path) -> None:
        """Remove a damaged entry, unless a writer replaced it since it was read."""
        with self._lock:
            try:
                damaged = path.stat().st_size < _CHECKSUM or not _checks_out(path)
            except FileNotFoundError:
                damaged = False
            if damaged and key in self._index:
                self._bytes -= self._index.pop(key)
                path.unlink(missing_ok=True)

    def _evict_locked(self) -> None:
        while len(self._index) > self.max_entries or self._bytes > self.max_bytes:
            victim, size = self._index.popitem(last=False)
            self._bytes -= size
            self._path_of(victim).unlink(missing_ok=True)

    def _path_of(self, key: Digest) -> Path:
        return self._entries / key.sha256[:2] / f"{key.sha256}-{key.size}"

    def _rebuild_index(self) -> None:
        """Index the entries a previous run left, oldest use first, and evict down to the bounds."""
        found: list[tuple[float, Digest, int]] = []
        with os.scandir(self._entries) as prefixes:
            for prefix in prefixes:
                if not prefix.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(prefix.path) as files:
                    for f in files:
                        match = _ENTRY_NAME.match(f.name)
                        if match is None or match.group(1)[:2] != prefix.name or not f.is_file():
                            continue
                        st = f.stat(follow_symlinks=False)
                        key = Digest(match.group(1), int(match.group(2)))
                        found.append((st.st_mtime, key, max(st.st_size - _CHECKSUM, 0)))
        found.sort(key=lambda item: item[0])
        with self._lock:
            for _, key, size in found:
                self._index[key] = size
                self._bytes += size
            before = len(self._index)
            self._evict_locked()
            _log.info(
                "action cache at %s: %d entries, %d bytes (%d evicted at start)",
                self.root,
                len(self._index),
                self._bytes,
                before - len(self._index),
            )


def _checks_out(path: Path) -> bool:
    data = path.read_bytes()
    return hashlib.sha256(data[_CHECKSUM:]).digest() == data[:_CHECKSUM]
