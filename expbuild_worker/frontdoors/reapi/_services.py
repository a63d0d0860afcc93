"""The REAPI storage services built from their parameters, and registered on a server by the caller."""

from __future__ import annotations

import concurrent.futures
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from expbuild_worker.api.reapi import bytestream_pb2 as bs_pb
from expbuild_worker.api.reapi import bytestream_pb2_grpc as bs_grpc
from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.engine import ExecutionEngine
from expbuild_worker.frontdoors import _grpc
from expbuild_worker.frontdoors.reapi._action_cache import ActionCacheServicer
from expbuild_worker.frontdoors.reapi._bytestream import ByteStreamServicer
from expbuild_worker.frontdoors.reapi._capabilities import CapabilitiesServicer, server_capabilities
from expbuild_worker.frontdoors.reapi._cas import ContentAddressableStorageServicer
from expbuild_worker.frontdoors.reapi._execution import ExecutionServicer
from expbuild_worker.frontdoors.reapi._names import check_instance_name
from expbuild_worker.storage import ActionCache, BlobStore

if TYPE_CHECKING:
    from expbuild_worker.frontdoors import FrontDoor

MIN_MESSAGE_BYTES = 64 << 10
"""The smallest message limit the services work with (a page of GetTree, a batch of blobs)."""


def batch_limit(max_message_bytes: int) -> int:
    """Blob bytes one batch call may carry: the message limit less 1/16 for the message's own fields."""
    return max_message_bytes - max_message_bytes // 16


EXECUTION_SERVICE = re_pb.DESCRIPTOR.services_by_name["Execution"].full_name
SERVICE_NAMES = (
    re_pb.DESCRIPTOR.services_by_name["Capabilities"].full_name,
    re_pb.DESCRIPTOR.services_by_name["ContentAddressableStorage"].full_name,
    bs_pb.DESCRIPTOR.services_by_name["ByteStream"].full_name,
    re_pb.DESCRIPTOR.services_by_name["ActionCache"].full_name,
)
"""Full names of the services ``ReapiStorageServices`` registers, for health checking and reflection."""


@dataclass(eq=False)
class ReapiStorageServices:
    """The Capabilities, ContentAddressableStorage, ByteStream and ActionCache servicers of one
    instance, and the Execution servicer when the worker executes: a ``FrontDoor``. They do not
    register themselves: the server that hosts them calls ``register``."""

    capabilities: CapabilitiesServicer
    content_addressable_storage: ContentAddressableStorageServicer
    byte_stream: ByteStreamServicer
    action_cache: ActionCacheServicer
    execution: ExecutionServicer | None = None
    name: str = "reapi"
    service_names: tuple[str, ...] = SERVICE_NAMES
    executing_service_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.execution is not None:
            self.service_names = (EXECUTION_SERVICE, *SERVICE_NAMES)
            self.executing_service_names = (EXECUTION_SERVICE,)

    def register(self, server: grpc.aio.Server) -> None:
        """Register every servicer on ``server`` (before it starts)."""
        if self.execution is not None:
            _grpc.register(server, re_grpc.add_ExecutionServicer_to_server, self.execution)
        _grpc.register(server, re_grpc.add_CapabilitiesServicer_to_server, self.capabilities)
        _grpc.register(
            server, re_grpc.add_ContentAddressableStorageServicer_to_server, self.content_addressable_storage
        )
        _grpc.register(server, bs_grpc.add_ByteStreamServicer_to_server, self.byte_stream)
        _grpc.register(server, re_grpc.add_ActionCacheServicer_to_server, self.action_cache)

    async def close(self) -> None:
        """Finish responses being built, drop unfinished uploads' bytes; after the server stopped."""
        if self.execution is not None:
            await self.execution.close()
        await self.byte_stream.close()


def build_reapi_storage_services(
    *,
    store: BlobStore,
    action_cache: ActionCache,
    instance_name: str = "",
    max_message_bytes: int,
    max_digests_per_request: int,
    exec_enabled: bool,
    engine: ExecutionEngine | None = None,
    worker_name: str = "",
    max_input_entries: int | None = None,
    pool: concurrent.futures.Executor | None = None,
    upload_keep_seconds: float = 600.0,
    max_idle_uploads: int = 256,
    result_blobs_kept_seconds: float = 60.0,
) -> ReapiStorageServices:
    """Build the storage services of the REAPI for one instance name, SHA-256 only.

    ``max_message_bytes`` is the smaller of the server's send and receive limits: batch calls,
    GetTree pages and inlined results stay under it, and GetCapabilities advertises
    ``batch_limit(max_message_bytes)`` as max_batch_total_size_bytes. ``exec_enabled`` is what
    GetCapabilities says about the Execution service: with an ``engine`` this front door serves
    it, without one others do (or nobody). ``pool`` runs
    every blocking call (None: the event loop's default executor). A broken upload's bytes are
    kept ``upload_keep_seconds`` for a resumption, at most ``max_idle_uploads`` of them. The blobs
    of a result GetActionResult returns are held in the store ``result_blobs_kept_seconds``.

    ValueError for an instance name clients could not use or limits too small to work with.
    """
    check_instance_name(instance_name)
    if max_message_bytes < MIN_MESSAGE_BYTES:
        raise ValueError(f"max_message_bytes: {max_message_bytes}, less than {MIN_MESSAGE_BYTES}")
    if max_digests_per_request < 1:
        raise ValueError(f"max_digests_per_request: {max_digests_per_request}, less than 1")
    max_batch = batch_limit(max_message_bytes)
    execution = (
        ExecutionServicer(
            engine=engine,
            store=store,
            action_cache=action_cache,
            instance_name=instance_name,
            worker_name=worker_name,
            pool=pool,
            max_input_entries=max_input_entries,
            result_blobs_kept_seconds=result_blobs_kept_seconds,
        )
        if exec_enabled and engine is not None
        else None
    )
    return ReapiStorageServices(
        execution=execution,
        capabilities=CapabilitiesServicer(
            instance_name=instance_name,
            capabilities=server_capabilities(exec_enabled=exec_enabled, max_batch_total_size_bytes=max_batch),
        ),
        content_addressable_storage=ContentAddressableStorageServicer(
            store=store,
            instance_name=instance_name,
            max_message_bytes=max_message_bytes,
            max_batch_total_size_bytes=max_batch,
            max_digests_per_request=max_digests_per_request,
            pool=pool,
        ),
        byte_stream=ByteStreamServicer(
            store=store,
            instance_name=instance_name,
            pool=pool,
            upload_keep_seconds=upload_keep_seconds,
            max_idle_uploads=max_idle_uploads,
        ),
        action_cache=ActionCacheServicer(
            store=store,
            cache=action_cache,
            instance_name=instance_name,
            max_message_bytes=max_message_bytes,
            result_blobs_kept_seconds=result_blobs_kept_seconds,
            pool=pool,
        ),
    )


if TYPE_CHECKING:  # mypy proves the services are a front door the server can host
    _front_door_contract: type[FrontDoor] = ReapiStorageServices
