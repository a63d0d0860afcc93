"""REAPI test helpers: the storage services on a real grpc.aio server (127.0.0.1, port 0), real store."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Any

import grpc

from expbuild_worker.api.reapi import bytestream_pb2_grpc as bs_grpc
from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.frontdoors.reapi import ReapiStorageServices, build_reapi_storage_services
from expbuild_worker.storage import ActionCache, ContentAddressedStore

MAX_MESSAGE = 4 << 20


def pb_digest(data: bytes) -> re_pb.Digest:
    return re_pb.Digest(hash=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


class ReapiServer:
    """The services served by their own event loop on a daemon thread; tests stay synchronous."""

    def __init__(self, root: Path, *, store_bytes: int, instance_name: str, **options: Any) -> None:
        self.store = ContentAddressedStore(root=root / "cas", max_bytes=store_bytes)
        self.action_cache = ActionCache(root=root / "ac", max_entries=100, max_bytes=1 << 20)
        self.instance_name = instance_name
        self.services: ReapiStorageServices = build_reapi_storage_services(
            store=self.store,
            action_cache=self.action_cache,
            instance_name=instance_name,
            max_message_bytes=MAX_MESSAGE,
            max_digests_per_request=options.pop("max_digests_per_request", 1000),
            exec_enabled=options.pop("exec_enabled", True),
            **options,
        )
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-reapi", daemon=True)
        self._thread.start()
        self._server, port = self.call(self._start())
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{port}",
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.cas = re_grpc.ContentAddressableStorageStub(self.channel)
        self.bytestream = bs_grpc.ByteStreamStub(self.channel)
        self.ac = re_grpc.ActionCacheStub(self.channel)
        self.capabilities = re_grpc.CapabilitiesStub(self.channel)

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
                ("grpc.so_reuseport", 0),
            ]
        )
        self.services.register(server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def upload(self, *blobs: bytes) -> list[re_pb.Digest]:
        """Store blobs through BatchUpdateBlobs; each must succeed."""
        response = self.cas.BatchUpdateBlobs(
            re_pb.BatchUpdateBlobsRequest(
                instance_name=self.instance_name,
                requests=[re_pb.BatchUpdateBlobsRequest.Request(digest=pb_digest(b), data=b) for b in blobs],
            )
        )
        assert [r.status.code for r in response.responses] == [0] * len(blobs)
        return [pb_digest(b) for b in blobs]

    def missing(self, *digests: re_pb.Digest) -> list[re_pb.Digest]:
        response = self.cas.FindMissingBlobs(
            re_pb.FindMissingBlobsRequest(instance_name=self.instance_name, blob_digests=digests)
        )
        return list(response.missing_blob_digests)

    def stop(self) -> None:
        self.channel.close()
        try:
            self.call(self._server.stop(0))
            self.call(self.services.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
