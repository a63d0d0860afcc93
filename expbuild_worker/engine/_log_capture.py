"""Logs as data: a decorator over the action runner that keeps stdout and stderr as blobs when asked."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import tempfile
from collections.abc import AsyncGenerator

from expbuild_worker.engine._executions import Execution
from expbuild_worker.engine._runner import ActionRunner, RunnerDecorator
from expbuild_worker.errors import WorkerError
from expbuild_worker.model import ActionEvent, ActionResult, Digest, LogChunk, LogStream
from expbuild_worker.storage import BlobPin, BlobStore

_log = logging.getLogger(__name__)

_IN_MEMORY_BYTES = 1 << 20
"""A log up to this size stays in memory; a longer one spills to a temporary file (on a thread)."""


class _LogSink:
    """One stream's bytes, hashed as they arrive, so the blob's digest is known without a re-read."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(max_size=_IN_MEMORY_BYTES)  # noqa: SIM115 - closed in close
        self._hash = hashlib.sha256()
        self.size = 0

    async def append(self, data: bytes) -> None:
        self._hash.update(data)
        self.size += len(data)
        if self.size > _IN_MEMORY_BYTES:  # on disk from here on: never write files on the event loop
            await asyncio.to_thread(self._file.write, data)
        else:
            self._file.write(data)

    def store(self, store: BlobStore, pin: BlobPin) -> Digest:
        """Write the bytes into ``store`` as one blob, pinned by ``pin`` (disk I/O: call on a thread)."""
        digest = Digest(self._hash.hexdigest(), self.size)
        if not store.contains(digest):
            writer = store.writer(digest)
            try:
                self._file.seek(0)
                while piece := self._file.read(_IN_MEMORY_BYTES):
                    writer.write(piece)
                writer.commit()
            except BaseException:
                writer.abort()
                raise
        pin.add(digest)
        return digest

    def close(self) -> None:
        self._file.close()


class LogCapturingRunner(RunnerDecorator):
    """For actions with ``capture_logs``, stores stdout and stderr as blobs and names them in the
    result; live chunks pass through unchanged. The blobs are pinned like outputs: until the
    result was consumed, or for the retention time when the caller reads them later. A store too
    full to take them leaves the digests unset and says so in the result's message."""

    def __init__(self, inner: ActionRunner, *, store: BlobStore, retention_seconds: float) -> None:
        super().__init__(inner)
        self._store = store
        self._retention = retention_seconds

    async def run(self, execution: Execution) -> AsyncGenerator[ActionEvent, None]:
        if not execution.action.capture_logs:
            async for event in self._inner.run(execution):
                yield event
            return
        sinks = {LogStream.STDOUT: _LogSink(), LogStream.STDERR: _LogSink()}
        pin = self._store.pin(())
        finished = False
        try:
            async for event in self._inner.run(execution):
                if isinstance(event, LogChunk):
                    await sinks[event.stream].append(event.data)
                elif isinstance(event, ActionResult):
                    finished = True
                    yield await self._with_log_blobs(event, sinks, pin)
                    continue
                yield event
        finally:
            for sink in sinks.values():
                sink.close()
            if finished and execution.action.retain_outputs:
                pin.release_after(self._retention)
            else:
                pin.release()

    async def _with_log_blobs(
        self, result: ActionResult, sinks: dict[LogStream, _LogSink], pin: BlobPin
    ) -> ActionResult:
        def store_both() -> tuple[Digest, Digest]:
            return (
                sinks[LogStream.STDOUT].store(self._store, pin),
                sinks[LogStream.STDERR].store(self._store, pin),
            )

        try:
            if sinks[LogStream.STDOUT].size or sinks[LogStream.STDERR].size:
                stdout, stderr = await asyncio.to_thread(store_both)
            else:  # the empty blob needs no disk: no thread hop for the common silent action
                stdout, stderr = store_both()
        except (WorkerError, OSError) as err:
            _log.warning("could not keep the logs of %s as blobs: %s", result.execution_id, err)
            note = f"stdout and stderr not kept as blobs: {err}"
            return dataclasses.replace(
                result, message=f"{result.message}; {note}" if result.message else note
            )
        return dataclasses.replace(result, stdout_digest=stdout, stderr_digest=stderr)
