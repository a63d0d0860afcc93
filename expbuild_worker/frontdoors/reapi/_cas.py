"""ContentAddressableStorage: find, batch-write, batch-read blobs and walk Directory trees."""

from __future__ import annotations

import base64
import binascii
import collections
import concurrent.futures

from google.protobuf.message import DecodeError
from google.rpc import code_pb2, status_pb2

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.errors import InvalidRequestError, NotFoundError
from expbuild_worker.frontdoors._grpc import BlockingCalls
from expbuild_worker.frontdoors._remote_actions import (
    check_digest_function,
    digest_from_pb,
    digest_to_pb,
    digests_from_pb,
    error_to_status,
    read_blob,
)
from expbuild_worker.frontdoors.reapi._errors import Context, maps_errors, send
from expbuild_worker.frontdoors.reapi._names import check_instance
from expbuild_worker.model import Digest
from expbuild_worker.storage import BlobStore

BATCH_ENTRY_BYTES = 256
"""What one BatchReadBlobs entry costs in the response besides its data, at most: the digest,
the framing and a status message. Counted so that many small blobs cannot push a response past
the message limit that their sizes alone stay under."""
DEFAULT_TREE_PAGE = 1000
"""Directories per GetTree page when the client leaves page_size at 0."""
_TOKEN_PREFIX = "t1"


def check_count(count: int, maximum: int, field: str) -> None:
    """Refuse a request listing more than ``maximum`` digests, before reading any of them."""
    if count > maximum:
        raise InvalidRequestError(
            f"{field}: {count} entries, more than this server takes in one request ({maximum}); "
            "split the request"
        )


class ContentAddressableStorageServicer(re_grpc.ContentAddressableStorageServicer):
    """Translates CAS calls into ``BlobStore`` calls. Every store call, and every loop over a
    request's entries, runs on ``pool`` (None: the event loop's default executor)."""

    def __init__(
        self,
        *,
        store: BlobStore,
        instance_name: str,
        max_message_bytes: int,
        max_batch_total_size_bytes: int,
        max_digests_per_request: int,
        pool: concurrent.futures.Executor | None,
    ) -> None:
        self._store = store
        self._instance = instance_name
        self._max_message = max_message_bytes
        self._max_batch = max_batch_total_size_bytes
        self._max_digests = max_digests_per_request
        self._pool = pool

    @maps_errors
    async def FindMissingBlobs(
        self, request: re_pb.FindMissingBlobsRequest, context: Context
    ) -> re_pb.FindMissingBlobsResponse:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        check_count(len(request.blob_digests), self._max_digests, "blob_digests")
        return await BlockingCalls(self._pool).run(self._find_missing, request)

    def _find_missing(self, request: re_pb.FindMissingBlobsRequest) -> re_pb.FindMissingBlobsResponse:
        missing = self._store.find_missing(digests_from_pb(request.blob_digests, "blob_digests"))
        return re_pb.FindMissingBlobsResponse(missing_blob_digests=[digest_to_pb(d) for d in missing])

    @maps_errors
    async def BatchUpdateBlobs(
        self, request: re_pb.BatchUpdateBlobsRequest, context: Context
    ) -> re_pb.BatchUpdateBlobsResponse:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        check_count(len(request.requests), self._max_digests, "requests")
        return await BlockingCalls(self._pool).run(self._update_all, request)

    def _update_all(self, request: re_pb.BatchUpdateBlobsRequest) -> re_pb.BatchUpdateBlobsResponse:
        total = sum(len(r.data) for r in request.requests)
        if total > self._max_batch:
            raise InvalidRequestError(
                f"requests: {total} bytes of blobs, more than max_batch_total_size_bytes "
                f"({self._max_batch}); upload large blobs with ByteStream.Write"
            )
        return re_pb.BatchUpdateBlobsResponse(
            responses=[self._update_one(i, r) for i, r in enumerate(request.requests)]
        )

    def _update_one(
        self, index: int, request: re_pb.BatchUpdateBlobsRequest.Request
    ) -> re_pb.BatchUpdateBlobsResponse.Response:
        """Store one blob; its own status says how that went (one bad blob spoils no other)."""
        try:
            digest = digest_from_pb(request.digest, f"requests[{index}].digest")
            if request.compressor != re_pb.Compressor.IDENTITY:
                raise InvalidRequestError(
                    f"requests[{index}].compressor: {request.compressor} is not accepted; send IDENTITY"
                )
            if len(request.data) != digest.size:
                raise InvalidRequestError(
                    f"requests[{index}].data: {len(request.data)} bytes, but the digest says {digest.size}"
                )
            if self._store.find_missing((digest,)):  # else present already (and now counted as used)
                with self._store.writer(digest) as writer:
                    writer.write(request.data)
                    writer.commit()
            status = status_pb2.Status(code=code_pb2.OK)
        except Exception as err:
            status = error_to_status(err)
        return re_pb.BatchUpdateBlobsResponse.Response(digest=request.digest, status=status)

    @maps_errors
    async def BatchReadBlobs(
        self, request: re_pb.BatchReadBlobsRequest, context: Context
    ) -> re_pb.BatchReadBlobsResponse:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        check_count(len(request.digests), self._max_digests, "digests")
        return await BlockingCalls(self._pool).run(self._read_all, request)

    def _read_all(self, request: re_pb.BatchReadBlobsRequest) -> re_pb.BatchReadBlobsResponse:
        digests = digests_from_pb(request.digests, "digests")
        total = sum(d.size for d in digests)
        if total > self._max_batch or total + len(digests) * BATCH_ENTRY_BYTES > self._max_message:
            raise InvalidRequestError(
                f"digests: {len(digests)} blobs of {total} bytes do not fit one response "
                f"(max_batch_total_size_bytes {self._max_batch}, message limit {self._max_message} "
                "bytes); read large blobs with ByteStream.Read"
            )
        return re_pb.BatchReadBlobsResponse(responses=[self._read_one(d) for d in digests])

    def _read_one(self, digest: Digest) -> re_pb.BatchReadBlobsResponse.Response:
        response = re_pb.BatchReadBlobsResponse.Response(digest=digest_to_pb(digest))
        try:
            response.data = read_blob(self._store, digest)
            response.status.code = code_pb2.OK
        except Exception as err:
            response.status.CopyFrom(error_to_status(err))
        return response

    @maps_errors
    async def GetTree(  # type: ignore[override]  # writes with send; see maps_errors
        self, request: re_pb.GetTreeRequest, context: Context
    ) -> None:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        root = digest_from_pb(request.root_digest, "root_digest")
        if request.page_size < 0:
            raise InvalidRequestError(f"page_size: expected zero or more, got {request.page_size}")
        page_size = request.page_size or DEFAULT_TREE_PAGE
        start = _decode_token(request.page_token, root) if request.page_token else 0
        walk = TreeWalk(self._store, root)
        calls = BlockingCalls(self._pool)
        await calls.run(walk.skip, start)
        budget = self._max_message - self._max_message // 16
        while True:
            page = await calls.run(walk.next_page, page_size, budget)
            token = "" if walk.done else _encode_token(root, walk.position)
            await send(context, re_pb.GetTreeResponse(directories=page, next_page_token=token))
            if not token:
                return


class TreeWalk:
    """The distinct Directory messages under a root, breadth first, each once, read on demand.

    The order depends only on the tree's content, so a position in it (what a page token
    holds) means the same in every later call. Used by one thread at a time.
    """

    def __init__(self, store: BlobStore, root: Digest) -> None:
        self._store = store
        self._root = root
        self._queue: collections.deque[tuple[Digest, str]] = collections.deque([(root, "")])
        self._seen = {root}
        self._peeked: re_pb.Directory | None = None
        self.position = 0
        """How many directories have been taken."""

    @property
    def done(self) -> bool:
        return self._peeked is None and not self._queue

    def skip(self, count: int) -> None:
        """Take ``count`` directories without returning them (resuming at a page token)."""
        for _ in range(count):
            if self._take() is None:
                raise InvalidRequestError(f"page_token: past the end of the tree under {self._root}")

    def next_page(self, max_count: int, max_bytes: int) -> list[re_pb.Directory]:
        """Up to ``max_count`` directories, at least one, of at most ``max_bytes`` serialized
        (one larger directory travels alone)."""
        page: list[re_pb.Directory] = []
        size = 0
        while len(page) < max_count and not self.done:
            directory = self._peek()
            cost = directory.ByteSize() + 8
            if page and size + cost > max_bytes:
                break
            page.append(directory)
            self._take()
            size += cost
        return page

    def _peek(self) -> re_pb.Directory:
        if self._peeked is None:
            self._peeked = self._read_next()
        return self._peeked

    def _take(self) -> re_pb.Directory | None:
        if self.done:
            return None
        directory = self._peek()
        self._peeked = None
        self.position += 1
        return directory

    def _read_next(self) -> re_pb.Directory:
        digest, path = self._queue.popleft()
        where = f"at {path!r} under root_digest" if path else "root_digest"
        try:
            data = read_blob(self._store, digest)
        except NotFoundError as err:
            raise NotFoundError(f"directory {digest} ({where}) is not in the CAS") from err
        directory = re_pb.Directory()
        try:
            directory.ParseFromString(data)
        except DecodeError as err:
            raise InvalidRequestError(f"root_digest: blob {digest} ({where}) is not a Directory") from err
        for i, node in enumerate(directory.directories):
            try:
                child = digest_from_pb(node.digest, f"directories[{i}].digest")
            except InvalidRequestError as err:
                raise InvalidRequestError(f"root_digest: directory {digest} ({where}): {err}") from err
            if child not in self._seen:
                self._seen.add(child)
                self._queue.append((child, f"{path}/{node.name}" if path else node.name))
        return directory


def _encode_token(root: Digest, position: int) -> str:
    raw = f"{_TOKEN_PREFIX}:{root.sha256}:{root.size}:{position}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, root: Digest) -> int:
    """The position a page token stands for; refused unless this server issued it for ``root``."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
        position = int(raw.rsplit(":", 1)[-1])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        position = 0
    if position <= 0 or _encode_token(root, position) != token:  # exactly what we would have issued
        raise InvalidRequestError("page_token: not a token this server issued for this root_digest")
    return position
