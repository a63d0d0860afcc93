"""The store's safety contract: pins, bytes on disk, refusal when full, restart, ranged reads."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from expbuild_worker.errors import (
    InvalidRequestError,
    MissingBlobsError,
    NotFoundError,
    PreconditionError,
    ResourceExhaustedError,
)
from expbuild_worker.model import Digest
from expbuild_worker.storage import ContentAddressedStore

BLOB = 64 << 10
GiB = 1 << 30
MiB = 1 << 20


class FakeClock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def unit(tmp_path: Path) -> int:
    """Bytes a dense BLOB-sized file occupies on this filesystem: the step the bounds are made of."""
    probe = tmp_path / "probe"
    probe.write_bytes(os.urandom(BLOB))
    on_disk = probe.stat().st_blocks * 512
    probe.unlink()
    return on_disk


def _blob(i: int) -> bytes:
    return i.to_bytes(4, "big") * (BLOB // 4)


def _read(store: ContentAddressedStore, d: Digest) -> bytes:
    return b"".join(store.open_blob(d))


def _files_on_disk(root: Path) -> tuple[int, int, int]:
    """Count, sizes and bytes on disk of the blob files actually present."""
    files = [p.stat() for p in (root / "blobs").glob("*/*")]
    return len(files), sum(st.st_size for st in files), sum(st.st_blocks * 512 for st in files)


class _Dir:
    """An action directory holding outputs, opened as a descriptor like output collection does."""

    def __init__(self, path: Path) -> None:
        path.mkdir()
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)

    def close(self) -> None:
        os.close(self.fd)


@pytest.fixture
def work(tmp_path: Path):
    d = _Dir(tmp_path / "work")
    yield d
    d.close()


@pytest.mark.parametrize("linked", [True, False], ids=["hard-linked", "copied"])
def test_a_sparse_output_counts_what_it_occupies_on_disk(tmp_path, work, linked):
    """A 1 GiB sparse output occupies a few KiB: a 10 MiB store takes it, and counts the few KiB."""
    path = work.path / "sparse"
    with open(path, "wb") as fh:
        fh.truncate(GiB)
        fh.write(b"head")
        fh.seek(GiB // 2)
        fh.write(b"middle")
    if not linked:  # a file with another name is copied into the store, holes and all
        os.link(path, tmp_path / "other-name")
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=10 * MiB)
    digest = store.adopt_file("sparse", dir_fd=work.fd)
    assert digest.size == GiB and store.contains(digest)
    assert store.total_bytes == GiB
    assert 0 < store.size_on_disk < MiB
    assert store.size_on_disk == _files_on_disk(tmp_path / "cas")[2]
    assert b"".join(store.open_blob(digest, offset=GiB // 2, limit=6)) == b"middle"


@pytest.mark.parametrize("linked", [True, False], ids=["hard-linked", "copied"])
def test_holes_are_hashed_and_staged_as_the_zeros_they_read_as(tmp_path, work, linked):
    """Skipping holes is an optimisation only: digest and staged bytes equal a plain read's."""
    path = work.path / "holey"
    with open(path, "wb") as fh:
        fh.truncate(5 * MiB + 123)  # a trailing hole, an odd size
        for offset in (0, 4097, 2 * MiB - 3, 3 * MiB):
            fh.seek(offset)
            fh.write(b"data" * 1000)
    content = path.read_bytes()
    if not linked:
        os.link(path, tmp_path / "other-name")
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=10 * MiB)
    digest = store.adopt_file("holey", dir_fd=work.fd)
    assert digest == Digest.of_bytes(content)
    staged = tmp_path / "staged"
    store.copy_to(digest, staged, executable=False)
    assert staged.read_bytes() == content
    assert staged.stat().st_blocks * 512 < MiB  # staging does not fill the holes either


def test_sparse_blobs_do_not_evict_other_actions_outputs(tmp_path, work, unit):
    """The hostile case: huge sparse outputs must not push out a pinned output before it is streamed."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=4 * unit)
    (work.path / "wanted").write_bytes(_blob(1))
    pin = store.pin([])
    wanted = store.adopt_file("wanted", dir_fd=work.fd, pin=pin)
    for i in range(6):
        with open(work.path / f"sparse{i}", "wb") as fh:
            fh.truncate(64 * MiB)
            fh.write(bytes([i]))
        store.adopt_file(f"sparse{i}", dir_fd=work.fd)
    assert _read(store, wanted) == _blob(1)
    assert store.size_on_disk <= store.max_bytes
    pin.release()


def test_pinned_blobs_survive_pressure_while_unpinned_ones_go(tmp_path, unit):
    """Eviction takes least recently used blobs but never one a running action holds."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=4 * unit)
    old = [store.put_bytes(_blob(i)) for i in range(3)]
    pin = store.pin([old[0]])  # the oldest, and pinned
    for i in range(3, 10):
        store.put_bytes(_blob(i))
    assert _read(store, old[0]) == _blob(0)
    assert not store.contains(old[1]) and not store.contains(old[2])
    assert store.size_on_disk <= store.max_bytes
    assert store.pinned_bytes == unit
    pin.release()
    assert store.pinned_bytes == 0


def test_pins_are_reference_counted(tmp_path, unit):
    """Two actions sharing an input: the blob stays until the last of them lets go."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=3 * unit)
    shared = store.put_bytes(_blob(0))
    first, second = store.pin([shared]), store.pin([shared, shared])
    assert second.digests == (shared,)
    first.release()
    first.release()  # idempotent: does not take the second action's hold away
    for i in range(1, 6):
        store.put_bytes(_blob(i))
    assert store.contains(shared)
    second.release()
    for i in range(6, 10):
        store.put_bytes(_blob(i))
    assert not store.contains(shared)


def test_a_store_full_of_pinned_blobs_refuses_new_ones(tmp_path, work, unit):
    """When running actions hold everything, the newcomer is refused, not a running action's blob."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=3 * unit)
    late = store.writer(Digest.of_bytes(_blob(9)))  # started while there was room
    late.write(_blob(9))
    held = [store.put_bytes(_blob(i)) for i in range(3)]
    pin = store.pin(held)
    with pytest.raises(ResourceExhaustedError, match=r"store full: \d+ of \d+ bytes are pinned"):
        late.commit()
    with pytest.raises(ResourceExhaustedError, match=r"storage\.max_bytes"):
        store.writer(Digest.of_bytes(_blob(8)))
    (work.path / "out").write_bytes(_blob(7))
    with pytest.raises(ResourceExhaustedError, match="pinned by running actions"):
        store.adopt_file("out", dir_fd=work.fd)
    assert [_read(store, d) for d in held] == [_blob(i) for i in range(3)]
    assert not store.contains(Digest.of_bytes(_blob(9)))
    assert (work.path / "out").read_bytes() == _blob(7)  # the output is left as it was
    assert os.listdir(tmp_path / "cas" / "tmp") == []
    pin.release()
    assert store.put_bytes(_blob(9)) == Digest.of_bytes(_blob(9))


def test_release_after_keeps_the_pin_until_its_deadline(tmp_path, unit):
    """Outputs stay readable for the retention time after an action ends, then become evictable."""
    clock = FakeClock()
    store = ContentAddressedStore(root=tmp_path, max_bytes=3 * unit, clock=clock)
    output = store.put_bytes(_blob(0))
    pin = store.pin([output])
    pin.release_after(10.0)
    clock.now += 9.5
    for i in range(1, 6):
        store.put_bytes(_blob(i))
    assert store.contains(output) and pin.digests == (output,)
    clock.now += 1.0
    for i in range(6, 12):
        store.put_bytes(_blob(i))
    assert not store.contains(output) and pin.digests == ()


def test_a_later_release_after_replaces_the_deadline(tmp_path, unit):
    """Extending retention (a client asked again) keeps the blob past the first deadline."""
    clock = FakeClock()
    store = ContentAddressedStore(root=tmp_path, max_bytes=3 * unit, clock=clock)
    output = store.put_bytes(_blob(0))
    pin = store.pin([output])
    pin.release_after(5.0)
    pin.release_after(50.0)
    clock.now += 20.0
    for i in range(1, 6):
        store.put_bytes(_blob(i))
    assert store.contains(output)
    pin.release()
    assert store.pinned_bytes == 0


def test_a_pin_past_its_deadline_takes_no_new_blobs(tmp_path, work, unit):
    """Adding to a pin whose retention ran out would hold the blob forever; it is refused instead."""
    clock = FakeClock()
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=4 * unit, clock=clock)
    pin = store.pin([store.put_bytes(_blob(0))])
    pin.release_after(1.0)
    clock.now += 2.0
    (work.path / "out").write_bytes(_blob(1))
    with pytest.raises(ValueError, match="released"):
        store.adopt_file("out", dir_fd=work.fd, pin=pin)
    with pytest.raises(ValueError, match="released"):
        pin.add(Digest.of_bytes(_blob(0)))
    assert store.pinned_bytes == 0 and os.listdir(tmp_path / "cas" / "tmp") == []


def test_pinning_absent_blobs_names_exactly_those_and_pins_nothing(tmp_path):
    """A queued action learns which inputs to upload again; the present ones are not held for it."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=MiB)
    present = store.put_bytes(b"present")
    gone, lost = Digest.of_bytes(b"gone"), Digest.of_bytes(b"lost")
    empty = Digest.of_bytes(b"")
    with pytest.raises(MissingBlobsError, match="uploaded again") as info:
        store.pin([gone, present, empty, lost, gone])
    assert info.value.digests == (gone, lost)
    assert isinstance(info.value, PreconditionError)
    assert str(gone) in str(info.value) and str(lost) in str(info.value)
    assert store.pinned_bytes == 0
    pin = store.pin([present, empty])  # the empty blob is always present
    with pytest.raises(MissingBlobsError) as info:
        pin.add(gone)
    assert info.value.digests == (gone,) and pin.digests == (present, empty)
    pin.release()
    with pytest.raises(ValueError, match="released"):
        pin.add(present)


def test_an_adopted_output_is_pinned_as_it_is_published(tmp_path, work, unit):
    """Output collection pins each output as it lands, so a burst of uploads cannot evict it."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=3 * unit)
    (work.path / "out").write_bytes(_blob(0))
    (work.path / "empty").write_bytes(b"")
    with store.pin([]) as pin:
        out = store.adopt_file("out", dir_fd=work.fd, pin=pin)
        empty = store.adopt_file("empty", dir_fd=work.fd, pin=pin)
        assert pin.digests == (out, empty)
        for i in range(1, 8):
            store.put_bytes(_blob(i))
        assert _read(store, out) == _blob(0)
    assert store.pinned_bytes == 0


def test_a_pin_of_another_store_is_refused(tmp_path, work):
    """Pinning in the wrong store would protect nothing; it is a programming error, said loudly."""
    one = ContentAddressedStore(root=tmp_path / "one", max_bytes=MiB)
    two = ContentAddressedStore(root=tmp_path / "two", max_bytes=MiB)
    (work.path / "out").write_bytes(b"out")
    with pytest.raises(ValueError, match="not made by this store"):
        two.adopt_file("out", dir_fd=work.fd, pin=one.pin([]))


def test_the_index_is_rebuilt_after_a_restart(tmp_path, unit):
    """A restarted worker still serves what it stored, forgets half-written files, keeps LRU order."""
    root = tmp_path / "cas"
    store = ContentAddressedStore(root=root, max_bytes=10 * unit)
    digests = [store.put_bytes(_blob(i)) for i in range(3)]
    for age, d in enumerate(digests):  # blob 0 used last, blob 2 longest ago
        os.utime(store.path_of(d), (2000 - age, 2000 - age))
    half = store.writer(Digest.of_bytes(_blob(5)))
    half.write(_blob(5)[:100])  # a run that dies mid-upload
    size_on_disk, total = store.size_on_disk, store.total_bytes

    again = ContentAddressedStore(root=root, max_bytes=10 * unit)
    assert again.find_missing(digests) == []
    assert (again.size_on_disk, again.total_bytes) == (size_on_disk, total)
    assert os.listdir(root / "tmp") == []
    assert _read(again, digests[2]) == _blob(2)

    smaller = ContentAddressedStore(root=root, max_bytes=2 * unit + unit // 2)
    assert smaller.find_missing(digests) == [digests[1]]  # the oldest unread one went at start
    assert smaller.size_on_disk == _files_on_disk(root)[2] <= smaller.max_bytes
    half.abort()


@pytest.mark.parametrize(
    ("offset", "limit", "expected"),
    [
        (0, None, b"0123456789"),
        (3, None, b"3456789"),
        (3, 4, b"3456"),
        (8, 100, b"89"),
        (10, None, b""),
        (0, 0, b""),
    ],
    ids=["whole", "from-offset", "window", "limit-past-end", "offset-at-end", "zero-limit"],
)
def test_open_blob_reads_a_range(tmp_path, offset, limit, expected):
    """A resumed download reads exactly the bytes it asks for."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=MiB)
    d = store.put_bytes(b"0123456789")
    assert b"".join(store.open_blob(d, offset=offset, limit=limit)) == expected


def test_open_blob_refuses_a_range_outside_the_blob(tmp_path):
    """An offset past the end is the client's mistake, not a missing blob."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=MiB)
    d = store.put_bytes(b"0123456789")
    with pytest.raises(InvalidRequestError, match="offset 11"):
        store.open_blob(d, offset=11)
    with pytest.raises(InvalidRequestError, match="negative"):
        store.open_blob(d, limit=-1)
    with pytest.raises(NotFoundError):
        store.open_blob(Digest.of_bytes(b"absent"))


def test_a_large_blob_streams_whole_in_chunks(tmp_path):
    """Multi-chunk reads from an offset come back in order and complete."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=16 * MiB)
    data = os.urandom(3 * MiB + 17)
    d = store.put_bytes(data)
    assert b"".join(store.open_blob(d, offset=MiB - 5)) == data[MiB - 5 :]


def test_an_open_stream_survives_eviction(tmp_path, unit):
    """A read that has started ends with every byte even if the blob is evicted meanwhile."""
    store = ContentAddressedStore(root=tmp_path, max_bytes=2 * unit)
    d = store.put_bytes(_blob(0))
    stream = store.open_blob(d)
    for i in range(1, 5):
        store.put_bytes(_blob(i))
    assert not store.contains(d)
    assert b"".join(stream) == _blob(0)


def test_a_blob_removed_behind_the_stores_back_is_not_found_and_forgotten(tmp_path):
    """If someone deletes a blob file, readers get NOT_FOUND and clients are told to upload it again."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=MiB)
    d = store.put_bytes(b"soon gone")
    store.path_of(d).unlink()
    with pytest.raises(NotFoundError, match=d.sha256):
        store.copy_to(d, tmp_path / "staged", executable=False)
    assert store.find_missing([d]) == [d] and store.size_on_disk == 0


def test_copy_to_never_writes_through_an_existing_path(tmp_path):
    """Staging cannot be redirected by a symlink planted where an input goes."""
    store = ContentAddressedStore(root=tmp_path / "cas", max_bytes=MiB)
    d = store.put_bytes(b"input")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "staged").symlink_to(victim)
    with pytest.raises(FileExistsError):
        store.copy_to(d, tmp_path / "staged", executable=False)
    assert victim.read_bytes() == b"precious"


def test_concurrent_writers_and_pinners_never_lose_a_pinned_blob(tmp_path, unit):
    """Under concurrent uploads and pins, pinned blobs stay readable and the books match the disk."""
    root = tmp_path / "cas"
    store = ContentAddressedStore(root=root, max_bytes=8 * unit)
    known: dict[Digest, bytes] = {}
    known_lock = threading.Lock()
    errors: list[BaseException] = []
    writing_done = threading.Event()

    def writer(base: int) -> None:
        try:
            for i in range(base, base + 25):
                data = _blob(i)
                d = store.put_bytes(data)
                with known_lock:
                    known[d] = data
        except BaseException as err:
            errors.append(err)

    def pinner(seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not writing_done.is_set():
                with known_lock:
                    candidates = list(known.items())
                if not candidates:
                    continue
                chosen = dict(rng.sample(candidates, min(2, len(candidates))))
                try:
                    pin = store.pin(chosen)
                except MissingBlobsError:
                    continue  # evicted before we asked: the honest answer
                with pin:
                    for d, data in chosen.items():
                        assert _read(store, d) == data
                        assert store.contains(d)
        except BaseException as err:
            errors.append(err)

    writers = [threading.Thread(target=writer, args=(1000 * k,)) for k in range(3)]
    pinners = [threading.Thread(target=pinner, args=(k,)) for k in range(3)]
    for t in pinners + writers:
        t.start()
    for t in writers:
        t.join()
    writing_done.set()
    for t in pinners:
        t.join()
    assert errors == []
    count, sizes, on_disk = _files_on_disk(root)
    assert (store.total_bytes, store.size_on_disk) == (sizes, on_disk)
    assert on_disk <= store.max_bytes and store.pinned_bytes == 0
    assert len(store.find_missing(known)) == len(known) - count
    assert os.listdir(root / "tmp") == []
