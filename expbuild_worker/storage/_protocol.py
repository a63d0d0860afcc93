"""The contracts every blob store keeps: ``BlobStore`` and the ``BlobPin`` it hands out."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from expbuild_worker.model import Digest

if TYPE_CHECKING:
    from expbuild_worker.storage._cas import BlobWriter


class BlobPin(Protocol):
    """Blobs held in a store on behalf of one user (an action): none of them is evicted while held.

    Pins are reference counted: two holders of one blob each keep it until both have let go.
    Every method may be called from any thread; none does disk I/O.
    """

    @property
    def digests(self) -> tuple[Digest, ...]:
        """The distinct digests this pin holds, in the order they were added."""
        ...

    def add(self, digest: Digest) -> None:
        """Hold one more blob; MissingBlobsError naming it when it is not in the store.

        A fetching store fetches here. Adding a digest already held is a no-op; adding to a
        released pin is a ValueError.
        """
        ...

    def release(self) -> None:
        """Let go of every blob now. Idempotent; a pin waiting on ``release_after`` is released at once."""
        ...

    def release_after(self, seconds: float) -> None:
        """Keep every blob for ``seconds`` more, then let go, without a thread or a timer per pin.

        A later call replaces the deadline; ``release`` still releases at once.
        """
        ...

    def __enter__(self) -> BlobPin: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Release (at once) when the block ends, however it ends."""
        ...


class BlobStore(Protocol):
    """A sha256-addressed store of verified blobs, bounded, with pins for blobs in use.

    Threads: every method may be called from any thread at once. Methods that do disk I/O
    (all but ``contains``, ``find_missing`` and ``pin``, which answer from memory, and a
    fetching store's ``pin``, which may wait on the network) must not run on the event loop:
    call them through ``asyncio.to_thread``, and iterate ``open_blob`` there too.

    A digest is its hash and its size: a blob with the same hash and another size is absent.
    The empty blob is always present and costs nothing.
    """

    def contains(self, digest: Digest) -> bool:
        """Whether the blob is present now (it may be evicted next, unless pinned). Never raises."""
        ...

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests that are not present, in request order; present ones count as just used."""
        ...

    def pin(self, digests: Iterable[Digest]) -> BlobPin:
        """Atomically check that every blob is present and hold them all (see ``BlobPin``).

        Raises MissingBlobsError listing exactly the absent digests (deduplicated, request
        order) and pins nothing when any is absent. A store that fetches from elsewhere does
        so here, before it gives up.
        """
        ...

    def open_blob(self, digest: Digest, *, offset: int = 0, limit: int | None = None) -> Iterator[bytes]:
        """The blob's bytes from ``offset``, at most ``limit`` of them (None: to the end), in chunks.

        Raises at the call, not on the first ``next``: NotFoundError when the blob is absent,
        InvalidRequestError for a negative limit or an offset outside ``0..size``. Once opened,
        the stream is complete even if the blob is evicted meanwhile. Counts as a use.
        """
        ...

    def writer(self, digest: Digest) -> BlobWriter:
        """A writer for ``digest``: ``write`` pieces in order, then ``commit`` (or ``abort``).

        ``received`` says where an interrupted upload resumes. Raises ResourceExhaustedError
        up front when the blob cannot fit (larger than the bound, the disk, or the room that
        pinned blobs leave); ``commit`` raises InvalidRequestError when content and digest
        disagree, and ResourceExhaustedError when pinned blobs leave no room by then.
        """
        ...

    def put_bytes(self, data: bytes) -> Digest:
        """Store a small blob held in memory and return its digest (errors as ``writer``)."""
        ...

    def copy_to(self, digest: Digest, dest: Path, *, executable: bool) -> None:
        """Create ``dest`` (O_EXCL, never following a symlink) as a copy of the blob, holes kept.

        A copy, so nothing done to ``dest`` reaches the store. NotFoundError when the blob is
        absent; FileExistsError when ``dest`` exists. Counts as a use.
        """
        ...

    def adopt_file(self, name: str, *, dir_fd: int, pin: BlobPin | None = None) -> Digest:
        """Take a finished regular file ``name`` in directory ``dir_fd`` into the store.

        The caller guarantees nothing writes the file any more. With ``pin``, the blob is
        held by it from the moment it is published. InvalidRequestError when ``name`` is not
        a regular file; ResourceExhaustedError when it cannot fit (the file is left as it was).
        """
        ...
