"""The store's in-memory index: bytes on disk, least-recently-used order and pin counts, no I/O."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(slots=True)
class IndexEntry:
    """One stored blob: its size, the bytes it occupies on disk, when it was last used, its holders."""

    size: int
    on_disk: int
    last_use: float
    pins: int = 0


class BlobIndex:
    """Which blobs are stored, keyed by sha256, and what they cost.

    Not thread-safe: the owning store calls every method under its lock, together with the
    file operation the call describes. Unpinned entries are kept apart from pinned ones, in
    least-recently-used order, so choosing what to evict never walks past a pinned blob.
    """

    def __init__(self) -> None:
        self._unpinned: OrderedDict[str, IndexEntry] = OrderedDict()  # least recently used first
        self._pinned: dict[str, IndexEntry] = {}
        self.on_disk = 0
        """Bytes the stored blobs occupy on disk: what the store's bound counts."""
        self.size = 0
        """The sum of the stored blobs' sizes."""
        self.pinned_on_disk = 0
        """Bytes on disk of the blobs that are pinned and so cannot be evicted."""

    def __len__(self) -> int:
        return len(self._unpinned) + len(self._pinned)

    def __iter__(self) -> Iterator[tuple[str, IndexEntry]]:
        yield from self._pinned.items()
        yield from self._unpinned.items()

    def get(self, sha256: str) -> IndexEntry | None:
        entry = self._unpinned.get(sha256)
        return entry if entry is not None else self._pinned.get(sha256)

    def add(self, sha256: str, entry: IndexEntry) -> None:
        """Record a blob just stored (the caller checked it was absent): the most recently used."""
        assert self.get(sha256) is None, sha256
        entry.pins = 0
        self._unpinned[sha256] = entry
        self.on_disk += entry.on_disk
        self.size += entry.size

    def remove(self, sha256: str) -> IndexEntry | None:
        """Forget a blob whatever its pins (its file is gone); later unpins of it are no-ops."""
        entry = self._unpinned.pop(sha256, None)
        if entry is None:
            entry = self._pinned.pop(sha256, None)
        if entry is not None:
            self.on_disk -= entry.on_disk
            self.size -= entry.size
            if entry.pins:
                self.pinned_on_disk -= entry.on_disk
                entry.pins = 0
        return entry

    def touch(self, sha256: str, now: float) -> None:
        """Mark a blob as just used; a pinned one moves to the recent end when it is unpinned."""
        entry = self.get(sha256)
        if entry is None:
            return
        entry.last_use = now
        if sha256 in self._unpinned:
            self._unpinned.move_to_end(sha256)

    def pin(self, sha256: str) -> None:
        """Add one holder to a stored blob."""
        entry = self._unpinned.pop(sha256, None)
        if entry is not None:
            self._pinned[sha256] = entry
            self.pinned_on_disk += entry.on_disk
        else:
            entry = self._pinned[sha256]
        entry.pins += 1

    def unpin(self, sha256: str, now: float) -> None:
        """Drop one holder; the last one out makes the blob evictable again, as just used."""
        entry = self._pinned.get(sha256)
        if entry is None:
            return
        entry.pins -= 1
        if entry.pins == 0:
            del self._pinned[sha256]
            self.pinned_on_disk -= entry.on_disk
            entry.last_use = now
            self._unpinned[sha256] = entry

    def make_room(self, need: int, *, limit: int, target: int) -> list[str] | None:
        """Choose and forget the blobs to evict so that ``need`` more bytes fit.

        Nothing is evicted while ``on_disk + need`` stays within ``limit``. Past it, least
        recently used unpinned blobs go until the total with ``need`` is at most ``target``
        (evicting in batches, not one blob per new one) or none is left. Returns None, and
        forgets nothing, when even evicting every unpinned blob would not bring the total
        within ``limit``: the pinned blobs leave no room.
        """
        if self.on_disk + need <= limit:
            return []
        if self.pinned_on_disk + need > limit:
            return None
        victims: list[str] = []
        while self._unpinned and self.on_disk + need > target:
            sha256, entry = self._unpinned.popitem(last=False)
            self.on_disk -= entry.on_disk
            self.size -= entry.size
            victims.append(sha256)
        return victims
