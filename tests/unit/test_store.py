"""The content-addressed store: verified writes, safe concurrency, bounded size."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from expbuild_worker.errors import InvalidRequestError, NotFoundError, ResourceExhaustedError
from expbuild_worker.model import Digest
from expbuild_worker.storage import ContentAddressedStore


def _digest(data: bytes) -> Digest:
    return Digest(hashlib.sha256(data).hexdigest(), len(data))


def test_write_verifies_and_publishes(tmp_path):
    """Only content that matches its digest becomes visible."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1 << 30)
    d = _digest(b"hello")
    w = store.writer(d)
    w.write(b"hel")
    w.write(b"lo")
    assert not store.contains(d)
    w.commit()
    assert store.contains(d) and b"".join(store.open_blob(d)) == b"hello"


def test_mismatch_and_overflow_are_refused(tmp_path):
    """Wrong content or too many bytes never reach the store, and leave no temporary file."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1 << 30)
    d = _digest(b"hello")
    w = store.writer(d)
    w.write(b"HELLO")
    with pytest.raises(InvalidRequestError, match="does not match"):
        w.commit()
    w2 = store.writer(d)
    with pytest.raises(InvalidRequestError, match="more than"):
        w2.write(b"hello!")
    assert not store.contains(d) and os.listdir(tmp_path / "tmp") == []


def test_concurrent_writers_of_one_blob(tmp_path):
    """Many writers of the same digest all succeed and the blob is intact."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1 << 30)
    data = os.urandom(1 << 20)
    d = _digest(data)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            w = store.writer(d)
            for i in range(0, len(data), 65536):
                w.write(data[i : i + 65536])
            w.commit()
        except BaseException as err:
            errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert b"".join(store.open_blob(d)) == data and store.total_bytes == len(data)


def test_least_recently_used_blobs_are_evicted(tmp_path):
    """Past the bound the least recently used blobs go (a read counts as a use) and the newest stays."""
    blob = 64 << 10
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(blob))
    on_disk = probe.stat().st_blocks * 512
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=3 * on_disk + on_disk // 2)
    digests = [store.put_bytes(bytes([i]) * blob) for i in range(3)]
    b"".join(store.open_blob(digests[0]))
    digests += [store.put_bytes(bytes([i]) * blob) for i in range(3, 5)]
    assert store.contains(digests[-1]) and store.contains(digests[0])
    assert not store.contains(digests[1])
    assert store.size_on_disk <= store.max_bytes


def test_copies_are_independent_of_the_store(tmp_path):
    """A staged input is a copy: changing it cannot change the stored blob."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=1 << 30)
    d = store.put_bytes(b"original")
    dest = tmp_path / "staged"
    store.copy_to(d, dest, executable=True)
    assert os.access(dest, os.X_OK)
    dest.write_bytes(b"changed!")
    assert b"".join(store.open_blob(d)) == b"original"


def test_unknown_blob_is_not_found(tmp_path):
    """Reading an absent blob is NotFoundError naming it."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1 << 30)
    d = _digest(b"absent")
    with pytest.raises(NotFoundError, match=d.sha256):
        store.open_blob(d)
    assert store.find_missing([d, _digest(b"")]) == [d]


def test_a_blob_larger_than_the_store_is_refused_before_a_byte_is_written(tmp_path):
    """The size a client claims is checked first: nothing lands on disk, nothing is kept."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1000)
    huge = Digest("a" * 64, 1 << 30)
    with pytest.raises(ResourceExhaustedError, match="more than the store holds"):
        store.writer(huge)
    assert list((tmp_path / "tmp").iterdir()) == []
    assert not store.contains(huge)


def test_an_output_larger_than_the_store_is_refused_and_not_kept(tmp_path):
    store = ContentAddressedStore(root=tmp_path, max_bytes=1000)
    work = tmp_path / "work"
    work.mkdir()
    (work / "big").write_bytes(os.urandom(5000))
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with pytest.raises(ResourceExhaustedError):
            store.adopt_file("big", dir_fd=fd)
    finally:
        os.close(fd)
    assert store.total_bytes == 0 and list((tmp_path / "blobs").rglob("*")) == []
    assert (work / "big").exists()


def test_a_digest_with_the_right_hash_but_another_size_is_not_found(tmp_path):
    """ReadBlob agrees with FindMissingBlobs: a digest is its hash and its size."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=1 << 20)
    d = store.put_bytes(b"hello")
    wrong = Digest(d.sha256, 99)
    assert not store.contains(wrong)
    with pytest.raises(NotFoundError, match="has 5 bytes"):
        store.open_blob(wrong)
