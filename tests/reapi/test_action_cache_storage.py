"""The on-disk action cache: persistent, bounded (LRU), safe with threads, never serving damage."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from expbuild_worker.errors import ResourceExhaustedError
from expbuild_worker.model import Digest
from expbuild_worker.storage import ActionCache


def _key(i: int) -> Digest:
    return Digest.of_bytes(f"action {i}".encode())


def test_entries_survive_a_restart(tmp_path: Path) -> None:
    """Results outlive the process, so a restarted worker still answers yesterday's cache hits."""
    cache = ActionCache(root=tmp_path, max_entries=10, max_bytes=1 << 20)
    cache.put(_key(1), b"result one")
    cache.put(_key(1), b"result one, replaced")
    cache.put(_key(2), b"result two")
    again = ActionCache(root=tmp_path, max_entries=10, max_bytes=1 << 20)
    assert again.get(_key(1)) == b"result one, replaced"
    assert again.get(_key(2)) == b"result two"
    assert again.get(_key(3)) is None
    assert (len(again), again.total_bytes) == (2, len(b"result one, replaced") + len(b"result two"))


def test_entry_bound_evicts_the_least_recently_used(tmp_path: Path) -> None:
    """A full cache drops what nobody asked for lately, keeping the entries builds still hit."""
    cache = ActionCache(root=tmp_path, max_entries=2, max_bytes=1 << 20)
    cache.put(_key(1), b"1")
    cache.put(_key(2), b"2")
    assert cache.get(_key(1)) == b"1"  # now the most recently used
    cache.put(_key(3), b"3")
    assert [cache.get(_key(i)) for i in (1, 2, 3)] == [b"1", None, b"3"]


def test_byte_bound_evicts_and_refuses_what_cannot_fit(tmp_path: Path) -> None:
    """The disk the cache may use is bounded; one value larger than the bound is refused outright."""
    cache = ActionCache(root=tmp_path, max_entries=100, max_bytes=100)
    cache.put(_key(1), b"a" * 60)
    cache.put(_key(2), b"b" * 60)
    assert cache.get(_key(1)) is None
    assert cache.total_bytes == 60
    with pytest.raises(ResourceExhaustedError):
        cache.put(_key(3), b"c" * 101)
    assert cache.get(_key(2)) == b"b" * 60


def test_a_damaged_entry_reads_as_a_miss(tmp_path: Path) -> None:
    """A file cut short by a crash must never be served as a result: it is a miss, and dropped."""
    cache = ActionCache(root=tmp_path, max_entries=10, max_bytes=1 << 20)
    cache.put(_key(1), b"a complete result")
    [entry] = (tmp_path / "entries").rglob("*-*")
    entry.write_bytes(entry.read_bytes()[:-3])
    again = ActionCache(root=tmp_path, max_entries=10, max_bytes=1 << 20)
    assert again.get(_key(1)) is None
    assert len(again) == 0


def test_concurrent_writers_and_readers(tmp_path: Path) -> None:
    """Threads of the front door share one cache: every read sees a whole value, the last write wins."""
    cache = ActionCache(root=tmp_path, max_entries=1000, max_bytes=1 << 20)
    values = {i: bytes([i]) * (100 + i) for i in range(8)}
    seen: list[bytes | None] = []

    def work(i: int) -> None:
        for _ in range(50):
            cache.put(_key(0), values[i])
            seen.append(cache.get(_key(0)))

    threads = [threading.Thread(target=work, args=(i,)) for i in values]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(v in values.values() for v in seen)
    assert len(cache) == 1
    assert cache.total_bytes == len(cache.get(_key(0)) or b"")
    assert list((tmp_path / "tmp").iterdir()) == []
