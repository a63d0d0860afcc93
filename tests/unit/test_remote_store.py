"""The remote-fetching store: inputs fetched once and in batches, outputs uploaded only when missing."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest

from expbuild_worker.errors import MissingBlobsError, NotFoundError, UnavailableError
from expbuild_worker.frontdoors.bot import GrpcRemoteCas
from expbuild_worker.model import Digest
from expbuild_worker.storage import ContentAddressedStore, RemoteStore
from expbuild_worker.storage._remote import BATCH_ENTRY_BYTES

MiB = 1 << 20


class FakeCas:
    """An in-memory remote CAS that records every call, so tests can count round trips."""

    def __init__(self, *, max_batch_bytes: int = 64 << 10, gate: threading.Event | None = None) -> None:
        self.blobs: dict[Digest, bytes] = {}
        self.calls: list[tuple[str, tuple[Digest, ...]]] = []
        self._max = max_batch_bytes
        self._gate = gate
        self._lock = threading.Lock()
        self.failing = False

    def add(self, data: bytes) -> Digest:
        digest = Digest.of_bytes(data)
        self.blobs[digest] = data
        return digest

    def _record(self, name: str, digests: Sequence[Digest]) -> None:
        if self.failing:
            raise UnavailableError(f"{name}: the remote is down")
        with self._lock:
            self.calls.append((name, tuple(digests)))
        if self._gate is not None:
            self._gate.wait(10)

    def count(self, name: str) -> int:
        return sum(1 for call, _ in self.calls if call == name)

    @property
    def max_batch_bytes(self) -> int:
        return self._max

    def find_missing(self, digests: Sequence[Digest]) -> list[Digest]:
        self._record("find_missing", digests)
        return [d for d in digests if d not in self.blobs]

    def read_batch(self, digests: Sequence[Digest]) -> dict[Digest, bytes]:
        self._record("read_batch", digests)
        return {d: self.blobs[d] for d in digests if d in self.blobs}

    def read_stream(self, digest: Digest) -> Iterator[bytes]:
        self._record("read_stream", [digest])
        if digest not in self.blobs:
            raise NotFoundError(f"{digest} absent")
        data = self.blobs[digest]
        return iter([data[i : i + 1000] for i in range(0, len(data), 1000)])

    def write_batch(self, blobs: Sequence[tuple[Digest, bytes]]) -> None:
        self._record("write_batch", [d for d, _ in blobs])
        for digest, data in blobs:
            self.blobs[digest] = data

    def write_stream(self, digest: Digest, chunks: Iterator[bytes]) -> None:
        self._record("write_stream", [digest])
        self.blobs[digest] = b"".join(chunks)


@pytest.fixture
def local(tmp_path: Path) -> ContentAddressedStore:
    return ContentAddressedStore(root=tmp_path / "cas", max_bytes=256 * MiB)


def _read(store: RemoteStore, digest: Digest) -> bytes:
    return b"".join(store.open_blob(digest))


def test_pin_fetches_absent_inputs_once_small_ones_batched_large_ones_streamed(local):
    """An action's inputs cost a few round trips, not one per file, and arrive byte-exact."""
    remote = FakeCas(max_batch_bytes=16 << 10)
    small = [remote.add(f"small {i}".encode() * 50) for i in range(40)]
    large = remote.add(bytes(range(256)) * 200)  # 51200 bytes: above the batch size
    store = RemoteStore(local=local, remote=remote, parallelism=4)
    with store.pin([*small, large]) as pin:
        assert set(pin.digests) == {*small, large}
    assert remote.count("read_stream") == 1
    batches = [digests for name, digests in remote.calls if name == "read_batch"]
    assert 1 < len(batches) < len(small)
    for digests in batches:
        assert sum(d.size + BATCH_ENTRY_BYTES for d in digests) <= 16 << 10
    for digest in [*small, large]:
        assert _read(store, digest) == remote.blobs[digest]
    before = len(remote.calls)
    store.pin([*small, large]).release()
    assert len(remote.calls) == before, "blobs already in the local store must not be fetched again"
    store.close()


def test_concurrent_askers_of_one_blob_share_one_fetch(local):
    """Two actions needing the same input at once fetch it once: the second waits for the first."""
    gate = threading.Event()
    remote = FakeCas(gate=gate)
    digest = remote.add(b"shared input")
    store = RemoteStore(local=local, remote=remote)
    results: list[list[Digest]] = []
    askers = [threading.Thread(target=lambda: results.append(store.fetch([digest]))) for _ in range(3)]
    for asker in askers:
        asker.start()
    while not remote.calls:
        threading.Event().wait(0.01)
    gate.set()
    for asker in askers:
        asker.join(10)
    assert results == [[], [], []]
    assert remote.count("read_batch") == 1
    store.close()


def test_a_blob_absent_everywhere_is_missing_by_name(local):
    """A missing input is FAILED_PRECONDITION naming it, so the client can upload it and retry."""
    remote = FakeCas()
    present = remote.add(b"here")
    absent = Digest.of_bytes(b"nowhere")
    store = RemoteStore(local=local, remote=remote)
    with pytest.raises(MissingBlobsError) as caught:
        store.pin([present, absent])
    assert caught.value.digests == (absent,)
    assert store.find_missing([present, absent]) == [absent]
    with pytest.raises(NotFoundError):
        store.open_blob(absent)
    store.close()


def test_a_failing_remote_is_unavailable_not_missing(local):
    """An unreachable CAS must read as an infrastructure failure (retried), never as missing inputs."""
    remote = FakeCas()
    digest = remote.add(b"unreachable")
    remote.failing = True
    store = RemoteStore(local=local, remote=remote)
    with pytest.raises(UnavailableError):
        store.pin([digest])
    remote.failing = False
    store.pin([digest]).release()  # a later attempt succeeds: nothing was left half-fetched
    assert _read(store, digest) == b"unreachable"
    store.close()


def test_upload_sends_only_what_the_remote_lacks(local):
    """Outputs the scheduler already holds are not sent again; the rest arrive byte-exact."""
    remote = FakeCas(max_batch_bytes=8 << 10)
    store = RemoteStore(local=local, remote=remote)
    known = local.put_bytes(b"the scheduler has this")
    remote.add(b"the scheduler has this")
    fresh = [local.put_bytes(f"output {i}".encode()) for i in range(5)]
    big = local.put_bytes(b"x" * (20 << 10))
    sent = store.upload([known, *fresh, big, Digest.of_bytes(b"")])
    assert set(sent) == {*fresh, big}
    assert remote.count("write_stream") == 1
    assert all(remote.blobs[d] == b"".join(local.open_blob(d)) for d in [*fresh, big])
    assert known not in [d for name, ds in remote.calls if name.startswith("write") for d in ds]
    store.close()


def test_uploads_and_fetches_fill_a_batch_alike(local):
    """A batch holds as many small blobs as fit the remote's limit, each entry's overhead counted
    once: two blobs that fit together travel in one call, both ways."""
    limit = 8 << 10
    size = limit // 2 - BATCH_ENTRY_BYTES  # two of them, with their overheads, make the limit
    remote = FakeCas(max_batch_bytes=limit)
    store = RemoteStore(local=local, remote=remote)
    pair = [local.put_bytes(bytes([i]) * size) for i in (1, 2)]
    store.upload(pair)
    assert remote.count("write_batch") == 1 and remote.count("write_stream") == 0
    fetched = [remote.add(bytes([i]) * size) for i in (3, 4)]
    store.pin(fetched).release()
    assert remote.count("read_batch") == 1 and remote.count("read_stream") == 0
    store.close()


def test_the_remote_store_fetches_from_a_real_reapi_cas(local, start_worker):
    """Against a real REAPI server (our own worker's CAS), blobs written there are fetched here exactly."""
    server = start_worker()
    channel = grpc.insecure_channel(server.target)
    try:
        remote = GrpcRemoteCas(channel=channel, instance_name="", max_batch_bytes=64 << 10)
        blobs = [f"blob {i}".encode() * (i + 1) for i in range(30)] + [bytes(range(256)) * 1024]
        digests = [server.server.worker.store.put_bytes(data) for data in blobs]
        store = RemoteStore(local=local, remote=remote, parallelism=3)
        with store.pin(digests):
            for digest, data in zip(digests, blobs, strict=True):
                assert _read(store, digest) == data
        output = local.put_bytes(b"an output only the bot has")
        assert store.upload([output, digests[0]]) == [output]
        assert server.server.worker.store.contains(output)
        store.close()
    finally:
        channel.close()


def test_the_remote_store_reaches_a_cas_behind_tls_and_a_token(local, start_worker, tmp_path):
    """The bot's scheduler connection: TLS with the scheduler's CA and a bearer token, as [bot] configures."""
    from _pki import TOKEN, make_pki

    from expbuild_worker.client import ChannelSecurity, open_channel

    pki = make_pki(tmp_path / "pki", "scheduler")
    token_file = tmp_path / "bot.token"
    token_file.write_text(TOKEN)
    server = start_worker(
        {
            "server": {
                "tls_certificate_file": str(pki.server_cert),
                "tls_private_key_file": str(pki.server_key),
                "tokens": [{"name": "bot", "file": str(token_file)}],
            }
        }
    )
    security = ChannelSecurity(ca_file=str(pki.ca), token_file=str(token_file))
    channel = open_channel(server.target, security)
    try:
        remote = GrpcRemoteCas(channel=channel, instance_name="", max_batch_bytes=64 << 10)
        digest = server.server.worker.store.put_bytes(b"fetched over TLS with a token")
        store = RemoteStore(local=local, remote=remote, parallelism=2)
        with store.pin([digest]):
            assert _read(store, digest) == b"fetched over TLS with a token"
        store.close()
    finally:
        channel.close()
