"""google.bytestream.ByteStream over the blob store: chunked reads, verified and resumable writes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from expbuild_worker.api.reapi import bytestream_pb2 as bs_pb
from expbuild_worker.api.reapi import bytestream_pb2_grpc as bs_grpc
from expbuild_worker.errors import InvalidRequestError, NotFoundError, UnavailableError
from expbuild_worker.frontdoors._grpc import BlockingCalls, message_pieces
from expbuild_worker.frontdoors._remote_actions import OutOfRangeError
from expbuild_worker.frontdoors.reapi._errors import Context, maps_errors, send
from expbuild_worker.frontdoors.reapi._names import BlobResource, parse_read_resource, parse_upload_resource
from expbuild_worker.model import Digest
from expbuild_worker.storage import BlobStore

if TYPE_CHECKING:
    from expbuild_worker.storage import BlobWriter

_log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Upload:
    """One upload's bytes so far, kept between streams so a broken one can be resumed.

    ``owner`` is the stream writing it now (None: idle since ``idle_since``); a newer stream
    for the same resource name takes it over, and the older one stops at its next message.
    ``calls`` keeps the writer's blocking calls in order across streams.
    """

    name: str
    digest: Digest
    writer: BlobWriter
    calls: BlockingCalls
    owner: object | None = None
    idle_since: float = field(default_factory=time.monotonic)


class _Uploads:
    """The kept uploads, by resource name. Used on the event loop only, so it needs no lock.

    Idle uploads are kept ``keep_seconds`` and at most ``max_idle`` of them (the least recently
    idle go first); dropping one aborts its writer (removing its temporary file) on the pool,
    after any call still running on it.
    """

    def __init__(
        self, *, pool: concurrent.futures.Executor | None, keep_seconds: float, max_idle: int
    ) -> None:
        self._pool = pool
        self._keep = keep_seconds
        self._max_idle = max_idle
        self._uploads: OrderedDict[str, _Upload] = OrderedDict()
        self._aborting: set[asyncio.Future[None]] = set()

    def get(self, name: str) -> _Upload | None:
        self._sweep()
        return self._uploads.get(name)

    def add(self, upload: _Upload) -> None:
        self._uploads[upload.name] = upload

    def release(self, upload: _Upload, owner: object) -> None:
        """The stream ``owner`` is done with ``upload``: it stays for a resumption, if still kept."""
        if upload.owner is owner and self._uploads.get(upload.name) is upload:
            upload.owner = None
            upload.idle_since = time.monotonic()
            self._uploads.move_to_end(upload.name)
            self._sweep()

    def drop(self, upload: _Upload) -> None:
        """Forget ``upload`` and abort its writer (a no-op for one already committed or aborted)."""
        if self._uploads.get(upload.name) is upload:
            del self._uploads[upload.name]
        upload.calls.finish(lambda: self.abort(upload.writer))

    def forget(self, upload: _Upload) -> None:
        """Forget a committed upload: its writer has nothing left to remove."""
        if self._uploads.get(upload.name) is upload:
            del self._uploads[upload.name]

    async def close(self) -> None:
        """Drop every kept upload and wait until their temporary files are gone."""
        for upload in list(self._uploads.values()):
            self.drop(upload)
        while self._aborting:
            await asyncio.wait(list(self._aborting))

    def _sweep(self) -> None:
        now = time.monotonic()
        idle = [u for u in self._uploads.values() if u.owner is None]
        for i, upload in enumerate(idle):
            if now - upload.idle_since > self._keep or len(idle) - i > self._max_idle:
                self.drop(upload)

    def abort(self, writer: BlobWriter) -> None:
        """Abort ``writer`` on the pool (it removes a file); ``close`` waits for it."""
        future = asyncio.get_running_loop().run_in_executor(self._pool, writer.abort)
        self._aborting.add(future)
        future.add_done_callback(self._aborted)

    def _aborted(self, future: asyncio.Future[None]) -> None:
        self._aborting.discard(future)
        if not future.cancelled() and future.exception() is not None:
            _log.warning("could not remove a dropped upload's bytes: %s", future.exception())


class ByteStreamServicer(bs_grpc.ByteStreamServicer):
    """Blobs as byte streams: ``{instance}/blobs/{hash}/{size}`` to read,
    ``{instance}/uploads/{uuid}/blobs/{hash}/{size}`` to write (``compressed-blobs/identity/…``
    too, whose bytes are the blob's own).

    A write is verified before the blob becomes visible: its bytes go to a private file that
    the store publishes only when size and hash match. A stream that breaks leaves its bytes
    kept under the resource name (see ``_Uploads``): QueryWriteStatus reports how many, and a
    new Write continues at that offset. Store calls run on ``pool`` (None: the event loop's
    default executor).
    """

    def __init__(
        self,
        *,
        store: BlobStore,
        instance_name: str,
        pool: concurrent.futures.Executor | None,
        upload_keep_seconds: float,
        max_idle_uploads: int,
    ) -> None:
        self._store = store
        self._instance = instance_name
        self._pool = pool
        self._uploads = _Uploads(pool=pool, keep_seconds=upload_keep_seconds, max_idle=max_idle_uploads)

    async def close(self) -> None:
        """Drop the bytes of unfinished uploads (at shutdown, after the server has stopped)."""
        await self._uploads.close()

    @maps_errors
    async def Read(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: bs_pb.ReadRequest, context: Context
    ) -> None:
        digest = parse_read_resource(request.resource_name, self._instance).digest
        if request.read_offset < 0 or request.read_offset > digest.size:
            raise OutOfRangeError(
                f"read_offset: {request.read_offset} is outside blob {digest} (0 to {digest.size})"
            )
        if request.read_limit < 0:
            raise OutOfRangeError(f"read_limit: expected zero (no limit) or more, got {request.read_limit}")
        calls = BlockingCalls(self._pool)
        chunks = await calls.run(
            lambda: self._store.open_blob(
                digest, offset=request.read_offset, limit=request.read_limit or None
            )
        )
        try:
            while chunk := await calls.run(next, chunks, b""):
                for piece in message_pieces(chunk):
                    await send(context, bs_pb.ReadResponse(data=piece))
        finally:
            calls.finish(lambda: _close(chunks))

    @maps_errors
    async def Write(
        self, request_iterator: AsyncIterator[bs_pb.WriteRequest], context: Context
    ) -> bs_pb.WriteResponse:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None:
            raise InvalidRequestError("resource_name: the stream carried no WriteRequest")
        name = first.resource_name
        resource = parse_upload_resource(name, self._instance)
        if self._store.contains(resource.digest):
            return self._already_stored(resource, self._uploads.get(name))
        me = object()
        upload = await self._claim(resource, name, me)
        try:
            request: bs_pb.WriteRequest | None = first
            while request is not None:
                if request is not first and request.resource_name not in ("", name):
                    raise InvalidRequestError(
                        f"resource_name: {request.resource_name!r} differs from the stream's first, {name!r}"
                    )
                if upload.owner is not me:
                    raise UnavailableError(f"{name}: a newer Write stream took this upload over")
                if self._store.contains(resource.digest):  # another client finished it meanwhile
                    return self._already_stored(resource, upload)
                await self._step(upload, _write_at, upload.writer, request.write_offset, request.data, name)
                if request.finish_write:
                    return await self._commit(upload)
                request = await anext(requests, None)
            if upload.writer.received == resource.digest.size:  # complete; finish_write forgotten
                return await self._commit(upload)
            raise InvalidRequestError(
                f"finish_write: the stream ended after {upload.writer.received} of {resource.digest.size} "
                f"bytes of {name} without finish_write; the bytes are kept: resume at that write_offset"
            )
        finally:
            self._uploads.release(upload, me)

    @maps_errors
    async def QueryWriteStatus(
        self, request: bs_pb.QueryWriteStatusRequest, context: Context
    ) -> bs_pb.QueryWriteStatusResponse:
        digest = parse_upload_resource(request.resource_name, self._instance).digest
        if self._store.contains(digest):
            return bs_pb.QueryWriteStatusResponse(committed_size=digest.size, complete=True)
        upload = self._uploads.get(request.resource_name)
        if upload is None:
            raise NotFoundError(
                f"resource_name: no upload of {request.resource_name!r} is in progress; start at offset 0"
            )
        return bs_pb.QueryWriteStatusResponse(committed_size=upload.writer.received, complete=False)

    async def _claim(self, resource: BlobResource, name: str, owner: object) -> _Upload:
        """The kept upload for ``name``, taken over from any older stream, or a new one."""
        upload = self._uploads.get(name)
        if upload is None:
            calls = BlockingCalls(self._pool)
            made: list[BlobWriter] = []
            try:
                await calls.run(lambda: made.append(self._store.writer(resource.digest)))
            except asyncio.CancelledError:  # the writer may exist by now: remove its file

                def abort_made() -> None:
                    for writer in made:
                        self._uploads.abort(writer)

                calls.finish(abort_made)
                raise
            upload = self._uploads.get(name)  # another stream may have started it meanwhile
            if upload is None:
                upload = _Upload(name=name, digest=resource.digest, writer=made[0], calls=calls)
                self._uploads.add(upload)
            else:
                self._uploads.abort(made[0])
        upload.owner = owner
        return upload

    async def _step(self, upload: _Upload, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a writer call after any still running; when it fails the writer is spent (its
        file is gone), so the upload is dropped, unless only the offset was wrong."""
        try:
            return await upload.calls.run(fn, *args)
        except _OffsetMismatch:
            raise
        except Exception:
            self._uploads.drop(upload)
            raise

    async def _commit(self, upload: _Upload) -> bs_pb.WriteResponse:
        """Verify and publish: a wrong digest is INVALID_ARGUMENT and leaves nothing stored."""
        await self._step(upload, upload.writer.commit)
        self._uploads.forget(upload)
        return bs_pb.WriteResponse(committed_size=upload.writer.received)

    def _already_stored(self, resource: BlobResource, upload: _Upload | None) -> bs_pb.WriteResponse:
        """The blob is stored (by this client earlier, or another): the write completes at once.

        The REAPI reports the full size for ``blobs/`` names and -1 for ``compressed-blobs/``
        ones (whose committed size counts compressed bytes the server did not receive).
        """
        if upload is not None:
            self._uploads.drop(upload)
        return bs_pb.WriteResponse(committed_size=-1 if resource.compressed else resource.digest.size)


class _OffsetMismatch(InvalidRequestError):
    """A write at the wrong offset: refused, the bytes already received kept."""


def _write_at(writer: BlobWriter, offset: int, data: bytes, name: str) -> None:
    """Append ``data`` if ``offset`` is where the upload stands. Runs on the pool, in order with
    every other call on the writer, so the offset it checks is the one the bytes land at."""
    if offset != writer.received:
        raise _OffsetMismatch(
            f"write_offset: {offset}, but {writer.received} bytes of {name} are committed; "
            "QueryWriteStatus says where to resume"
        )
    if data:
        writer.write(data)


def _close(chunks: Iterator[bytes]) -> None:
    """Close the blob's file now rather than when the garbage collector finds the generator."""
    if isinstance(chunks, Generator):
        chunks.close()
