"""ActionCache: results a client can download in full, or none; updates that reference stored blobs."""

from __future__ import annotations

import concurrent.futures
import logging

from google.protobuf.message import DecodeError

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.errors import InvalidRequestError, MissingBlobsError, NotFoundError, name_some
from expbuild_worker.frontdoors._grpc import BlockingCalls
from expbuild_worker.frontdoors._remote_actions import check_digest_function, digest_from_pb, read_blob
from expbuild_worker.frontdoors.reapi._errors import Context, maps_errors
from expbuild_worker.frontdoors.reapi._names import check_instance
from expbuild_worker.model import Digest
from expbuild_worker.storage import ActionCache, BlobStore

_log = logging.getLogger(__name__)

INLINE_RESERVE_BYTES = 64 << 10
"""Room left in a GetActionResult response, besides the result, when contents are inlined."""


def referenced_blobs(
    store: BlobStore, result: re_pb.ActionResult, field: str = "action_result"
) -> list[Digest]:
    """Every blob a client needs to take ``result`` in full, deduplicated.

    Output files, stdout and stderr, each output directory's Tree blob and every file the Tree
    lists, and a root Directory when one is given. A Tree that is absent is listed itself (its
    files cannot be known); one that is present is read (this does disk I/O: call on a thread).
    InvalidRequestError names the field of a malformed digest or a blob that is not a Tree.
    """
    wanted: dict[Digest, None] = {}
    for i, f in enumerate(result.output_files):
        wanted[digest_from_pb(f.digest, f"{field}.output_files[{i}].digest")] = None
    for name in ("stdout_digest", "stderr_digest"):
        if result.HasField(name):
            wanted[digest_from_pb(getattr(result, name), f"{field}.{name}")] = None
    for i, d in enumerate(result.output_directories):
        where = f"{field}.output_directories[{i}]"
        if d.HasField("root_directory_digest"):
            wanted[digest_from_pb(d.root_directory_digest, f"{where}.root_directory_digest")] = None
        if not d.HasField("tree_digest") and d.HasField("root_directory_digest"):
            continue
        tree_digest = digest_from_pb(d.tree_digest, f"{where}.tree_digest")
        wanted[tree_digest] = None
        if store.find_missing((tree_digest,)):
            continue
        tree = re_pb.Tree()
        try:
            tree.ParseFromString(read_blob(store, tree_digest))
        except DecodeError as err:
            raise InvalidRequestError(f"{where}.tree_digest: blob {tree_digest} is not a Tree") from err
        except NotFoundError:  # evicted since the check just above
            continue
        for j, directory in enumerate((tree.root, *tree.children)):
            for k, node in enumerate(directory.files):
                wanted[digest_from_pb(node.digest, f"{where}.tree_digest (directory {j}, file {k})")] = None
    return list(wanted)


def cached_result(
    store: BlobStore, cache: ActionCache, action: Digest, *, keep_seconds: float
) -> re_pb.ActionResult | None:
    """The cached result of ``action`` when every blob it references is still in the store, and
    then those blobs held there for ``keep_seconds`` so the client can download them; None
    otherwise (a result whose blobs are gone, or that cannot be read, is dropped). Disk I/O:
    call on a thread."""
    data = cache.get(action)
    if data is None:
        return None
    result = re_pb.ActionResult()
    try:
        result.ParseFromString(data)
        blobs = referenced_blobs(store, result)
    except (DecodeError, InvalidRequestError) as err:
        _log.warning("cached result of action %s is unusable (%s); dropped", action, err)
        cache.remove(action)
        return None
    try:
        pin = store.pin(blobs)
    except MissingBlobsError as err:
        _log.info(
            "cached result of action %s refers to %d blob(s) no longer in the CAS (%s)",
            action,
            len(err.digests),
            name_some(err.digests),
        )
        return None
    pin.release_after(keep_seconds)
    return result


class ActionCacheServicer(re_grpc.ActionCacheServicer):
    """Results are stored as the client sent them (serialized) and checked when read back.

    GetActionResult answers only when every blob the result references is in the store, and
    then holds them there (``BlobPin.release_after``) for ``result_blobs_kept_seconds``, so the
    client can download what it was promised. Store and cache calls run on ``pool`` (None: the
    event loop's default executor).
    """

    def __init__(
        self,
        *,
        store: BlobStore,
        cache: ActionCache,
        instance_name: str,
        max_message_bytes: int,
        result_blobs_kept_seconds: float,
        pool: concurrent.futures.Executor | None,
    ) -> None:
        self._store = store
        self._cache = cache
        self._instance = instance_name
        self._max_message = max_message_bytes
        self._keep = result_blobs_kept_seconds
        self._pool = pool

    @maps_errors
    async def GetActionResult(
        self, request: re_pb.GetActionResultRequest, context: Context
    ) -> re_pb.ActionResult:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        action = digest_from_pb(request.action_digest, "action_digest")
        return await BlockingCalls(self._pool).run(self._get, action, request)

    def _get(self, action: Digest, request: re_pb.GetActionResultRequest) -> re_pb.ActionResult:
        result = cached_result(self._store, self._cache, action, keep_seconds=self._keep)
        if result is None:
            raise NotFoundError(f"action {action} has no usable cached result (none, or its blobs are gone)")
        self._inline(result, request)
        return result

    def _inline(self, result: re_pb.ActionResult, request: re_pb.GetActionResultRequest) -> None:
        """Put the contents the client asked for into the result while the response stays under
        the message limit; what does not fit is left to download by digest, as the REAPI allows."""
        budget = self._max_message - INLINE_RESERVE_BYTES - result.ByteSize()
        wanted_files = set(request.inline_output_files)
        for asked, digest_field, raw_field in (
            (request.inline_stdout, "stdout_digest", "stdout_raw"),
            (request.inline_stderr, "stderr_digest", "stderr_raw"),
        ):
            if asked and result.HasField(digest_field) and not getattr(result, raw_field):
                size = getattr(result, digest_field).size_bytes
                if size <= budget:
                    setattr(result, raw_field, read_blob(self._store, _digest(getattr(result, digest_field))))
                    budget -= size + 8
        for f in result.output_files:
            if f.path in wanted_files and not f.contents and f.digest.size_bytes <= budget:
                f.contents = read_blob(self._store, _digest(f.digest))
                budget -= f.digest.size_bytes + 8

    @maps_errors
    async def UpdateActionResult(
        self, request: re_pb.UpdateActionResultRequest, context: Context
    ) -> re_pb.ActionResult:
        check_instance(request.instance_name, self._instance)
        check_digest_function(request.digest_function)
        action = digest_from_pb(request.action_digest, "action_digest")
        return await BlockingCalls(self._pool).run(self._update, action, request.action_result)

    def _update(self, action: Digest, result: re_pb.ActionResult) -> re_pb.ActionResult:
        missing = self._store.find_missing(referenced_blobs(self._store, result))
        if missing:
            raise MissingBlobsError(
                f"action_result: refers to {len(missing)} blob(s) not in the CAS ({name_some(missing)}); "
                "upload them first",
                digests=tuple(missing),
            )
        self._cache.put(action, result.SerializeToString(deterministic=True))
        return result


def _digest(digest: re_pb.Digest) -> Digest:
    return Digest(digest.hash, digest.size_bytes)
