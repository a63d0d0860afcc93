"""A blob store that fetches what it lacks from a remote CAS and uploads what the remote lacks."""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from expbuild_worker.errors import MissingBlobsError, NotFoundError, UnavailableError, name_some
from expbuild_worker.model import Digest
from expbuild_worker.storage._cas import BlobWriter, ContentAddressedStore, StorePin
from expbuild_worker.storage._protocol import BlobPin

_log = logging.getLogger(__name__)

_PIN_ROUNDS = 3
"""How often ``pin`` fetches again when a blob it fetched was evicted before it could be held
(only a store far too small for one action's inputs keeps losing that race)."""
BATCH_ENTRY_BYTES = 256
"""What one entry of a batch costs in the message besides its data (digest, framing, status), at
most: counted so that many small blobs cannot push a batch past a message limit their sizes alone
stay under."""


class RemoteCas(Protocol):
    """The calls a remote content-addressable storage answers, in model terms, blocking.

    Implementations translate them to a wire protocol (REAPI's CAS and ByteStream for the bot)
    and may be called from several threads at once. Failures of the remote itself raise
    UnavailableError; a blob the remote lacks is reported as such, never as an error.
    """

    @property
    def max_batch_bytes(self) -> int:
        """Most bytes of blob data one batch read or write may carry."""
        ...

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        """The digests the remote does not hold."""
        ...

    def read_batch(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        """The blobs' bytes in one call; blobs the remote lacks are left out."""
        ...

    def read_stream(self, digest: Digest) -> Iterator[bytes]:
        """One (large) blob's bytes in chunks; NotFoundError at the call when the remote lacks it."""
        ...

    def write_batch(self, blobs: Sequence[tuple[Digest, bytes]]) -> None:
        """Store the blobs in one call."""
        ...

    def write_stream(self, digest: Digest, chunks: Iterator[bytes]) -> None:
        """Store one (large) blob from its chunks."""
        ...


class RemotePin:
    """A pin of a RemoteStore: the local store's pin, whose ``add`` fetches first."""

    def __init__(self, store: RemoteStore, local: StorePin) -> None:
        self._store = store
        self.local = local

    @property
    def digests(self) -> tuple[Digest, ...]:
        return self.local.digests

    def add(self, digest: Digest) -> None:
        self._store.fetch([digest])
        self.local.add(digest)

    def release(self) -> None:
        self.local.release()

    def release_after(self, seconds: float) -> None:
        self.local.release_after(seconds)

    def __enter__(self) -> RemotePin:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class RemoteStore:
    """A ``BlobStore`` over the local store that fetches absent blobs from a remote CAS.

    The local store is the cache: a blob is fetched once, whoever asks for it and however
    many ask at once (later askers wait for the first fetch), and then served locally until
    evicted. Absent blobs are fetched in parallel, small ones packed into batch reads and large
    ones streamed one each, straight into the local store (verified there, never whole in
    memory). Writes (outputs, logs, Trees) go to the local store only; ``upload`` sends the
    ones the remote lacks.

    Threads: like every BlobStore, call it off the event loop; fetching and uploading block on
    the network. ``contains`` never fetches; ``find_missing``, ``pin``, ``open_blob`` and
    ``copy_to`` do, so a reader that asks for a level of a tree at once pays one round trip
    per batch, not one per blob.
    """

    def __init__(
        self,
        *,
        local: ContentAddressedStore,
        remote: RemoteCas,
        parallelism: int = 8,
        stream_chunk_bytes: int = 1 << 20,
    ) -> None:
        if parallelism < 1:
            raise ValueError(f"parallelism must be at least 1, got {parallelism}")
        self.local = local
        self.remote = remote
        self._chunk = stream_chunk_bytes
        self._pool = concurrent.futures.ThreadPoolExecutor(parallelism, thread_name_prefix="expbuild-fetch")
        self._lock = threading.Lock()
        self._inflight: dict[Digest, concurrent.futures.Future[bool]] = {}

    def close(self) -> None:
        """Stop the fetch threads (fetches in progress finish first)."""
        self._pool.shutdown(wait=True, cancel_futures=True)

    # ---- the BlobStore protocol ------------------------------------------------------------

    def contains(self, digest: Digest) -> bool:
        return self.local.contains(digest)

    def find_missing(self, digests: Iterable[Digest]) -> list[Digest]:
        """The digests neither here nor in the remote; those only in the remote are fetched now."""
        wanted = list(digests)
        absent = set(self.fetch(wanted))
        return [d for d in wanted if d in absent]

    def pin(self, digests: Iterable[Digest]) -> RemotePin:
        """Fetch what is absent, then hold everything; MissingBlobsError names what the remote lacks too."""
        wanted = list(dict.fromkeys(digests))
        for _ in range(_PIN_ROUNDS):
            try:
                return RemotePin(self, self.local.pin(wanted))
            except MissingBlobsError as err:
                lacking = self.fetch([d for d in err.digests if isinstance(d, Digest)])
                if lacking:
                    raise MissingBlobsError(_missing_message(lacking), digests=tuple(lacking)) from None
        return RemotePin(self, self.local.pin(wanted))

    def open_blob(self, digest: Digest, *, offset: int = 0, limit: int | None = None) -> Iterator[bytes]:
        try:  # the local store first: most blobs were fetched ahead (pin, find_missing)
            return self.local.open_blob(digest, offset=offset, limit=limit)
        except NotFoundError:
            self._fetch_or_raise(digest)
        return self.local.open_blob(digest, offset=offset, limit=limit)

    def writer(self, digest: Digest) -> BlobWriter:
        return self.local.writer(digest)

    def put_bytes(self, data: bytes) -> Digest:
        return self.local.put_bytes(data)

    def copy_to(self, digest: Digest, dest: Path, *, executable: bool) -> None:
        try:
            self.local.copy_to(digest, dest, executable=executable)
            return
        except NotFoundError:
            self._fetch_or_raise(digest)
        self.local.copy_to(digest, dest, executable=executable)

    def adopt_file(self, name: str, *, dir_fd: int, pin: BlobPin | None = None) -> Digest:
        local_pin = pin.local if isinstance(pin, RemotePin) else pin
        return self.local.adopt_file(name, dir_fd=dir_fd, pin=local_pin)

    # ---- fetching --------------------------------------------------------------------------

    def fetch(self, digests: Iterable[Digest]) -> list[Digest]:
        """Bring every absent blob into the local store; return those the remote lacks too.

        Blocks until all are fetched (or known absent). A blob another caller is fetching
        already is waited for, not fetched again. UnavailableError when the remote fails.
        """
        wanted = list(dict.fromkeys(digests))
        mine: dict[Digest, concurrent.futures.Future[bool]] = {}
        waits: dict[Digest, concurrent.futures.Future[bool]] = {}
        with self._lock:
            for digest in self.local.find_missing(wanted):
                running = self._inflight.get(digest)
                if running is None:
                    running = mine[digest] = self._inflight[digest] = concurrent.futures.Future()
                waits[digest] = running
        if mine:
            self._fetch_now(list(mine), mine)
        lacking = []
        for digest, future in waits.items():
            if not future.result():
                lacking.append(digest)
        return lacking

    def _fetch_now(
        self, digests: list[Digest], futures: dict[Digest, concurrent.futures.Future[bool]]
    ) -> None:
        """Fetch ``digests`` (this caller's to fetch) and settle each one's future."""
        small, large = self._split(digests)
        jobs: list[tuple[concurrent.futures.Future[dict[Digest, bool]], list[Digest]]] = []
        for batch in _batches(small, self.remote.max_batch_bytes):
            jobs.append((self._pool.submit(self._fetch_batch, batch), batch))
        for digest in large:
            jobs.append((self._pool.submit(self._fetch_large, digest), [digest]))
        try:
            for job, batch in jobs:
                try:
                    outcome = job.result()
                except BaseException as err:
                    for digest in batch:
                        self._settle(futures[digest], error=err, digest=digest)
                    continue
                for digest in batch:
                    self._settle(futures[digest], found=outcome.get(digest, False), digest=digest)
        finally:
            for digest, future in futures.items():  # whatever was not settled (an interruption)
                if not future.done():
                    self._settle(future, error=UnavailableError("the fetch was interrupted"), digest=digest)
        errors = [f.exception() for f in futures.values() if f.exception() is not None]
        if errors:
            raise UnavailableError(f"fetching {len(errors)} blob(s) from the remote CAS failed: {errors[0]}")

    def _settle(
        self,
        future: concurrent.futures.Future[bool],
        *,
        digest: Digest,
        found: bool = False,
        error: BaseException | None = None,
    ) -> None:
        with self._lock:
            self._inflight.pop(digest, None)
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(found)

    def _batch_limit(self) -> int:
        """Blobs up to this size travel in batches; larger ones are streamed."""
        return max(1, self.remote.max_batch_bytes - BATCH_ENTRY_BYTES)

    def _split(self, digests: Iterable[Digest]) -> tuple[list[Digest], list[Digest]]:
        """The blobs that travel in batches, smallest first, and those streamed one each."""
        limit = self._batch_limit()
        small: list[Digest] = []
        large: list[Digest] = []
        for digest in digests:
            (small if digest.size <= limit else large).append(digest)
        small.sort(key=lambda d: d.size)
        return small, large

    def _fetch_batch(self, batch: list[Digest]) -> dict[Digest, bool]:
        blobs = self.remote.read_batch(batch)
        found: dict[Digest, bool] = {}
        for digest in batch:
            data = blobs.get(digest)
            if data is None:
                found[digest] = False
                continue
            with self.local.writer(digest) as writer:  # verifies the content against the digest
                writer.write(data)
                writer.commit()
            found[digest] = True
        return found

    def _fetch_large(self, digest: Digest) -> dict[Digest, bool]:
        try:
            chunks = self.remote.read_stream(digest)
        except NotFoundError:
            return {digest: False}
        with self.local.writer(digest) as writer:
            for chunk in chunks:
                writer.write(chunk)
            writer.commit()
        return {digest: True}

    def _fetch_or_raise(self, digest: Digest) -> None:
        if self.fetch([digest]):
            raise NotFoundError(f"blob {digest} is neither in the local store nor in the remote CAS")

    # ---- uploading -------------------------------------------------------------------------

    def upload(self, digests: Iterable[Digest]) -> list[Digest]:
        """Send the blobs the remote lacks (asked with one FindMissingBlobs), in parallel.

        Returns what was sent. Every blob must be in the local store (pin it first):
        NotFoundError otherwise. UnavailableError when the remote fails.
        """
        wanted = [d for d in dict.fromkeys(digests) if d.size > 0]
        if not wanted:
            return []
        missing = self.remote.find_missing(wanted)
        small, large = self._split(missing)
        jobs = [
            self._pool.submit(self._upload_batch, batch)
            for batch in _batches(small, self.remote.max_batch_bytes)
        ]
        jobs += [self._pool.submit(self._upload_large, digest) for digest in large]
        errors = []
        for job in jobs:
            try:
                job.result()
            except BaseException as err:
                errors.append(err)
        if errors:
            if isinstance(errors[0], NotFoundError):
                raise errors[0]
            raise UnavailableError(f"uploading to the remote CAS failed: {errors[0]}") from errors[0]
        return missing

    def _upload_batch(self, batch: list[Digest]) -> None:
        self.remote.write_batch([(d, b"".join(self.local.open_blob(d))) for d in batch])

    def _upload_large(self, digest: Digest) -> None:
        self.remote.write_stream(digest, self.local.open_blob(digest))


def _batches(digests: list[Digest], limit: int) -> Iterator[list[Digest]]:
    """Consecutive groups of ``digests`` whose sizes, each entry's overhead counted, add up to at
    most ``limit`` (a blob too large for that alone goes in a group of its own)."""
    batch: list[Digest] = []
    total = 0
    for digest in digests:
        cost = digest.size + BATCH_ENTRY_BYTES
        if batch and total + cost > limit:
            yield batch
            batch, total = [], 0
        batch.append(digest)
        total += cost
    if batch:
        yield batch


def _missing_message(missing: list[Digest]) -> str:
    named = name_some(missing)
    return f"{len(missing)} blob(s) are neither in the local store nor in the remote CAS: {named}"
