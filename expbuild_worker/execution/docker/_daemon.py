"""The daemon connection: a lazily connected Docker SDK client, its blocking calls on a small thread pool."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions

from expbuild_worker.errors import UnavailableError

T = TypeVar("T")

DEFAULT_ADDRESS = "unix:///var/run/docker.sock"


def is_local_address(address: str) -> bool:
    """True when the daemon shares this machine's filesystem (a Unix socket or a Windows named pipe)."""
    return address.startswith(("unix://", "npipe://", "http+unix://"))


def status_of(err: BaseException) -> int | None:
    """The HTTP status of a daemon error, or None when it is not an API error."""
    if isinstance(err, docker.errors.APIError):
        code = err.status_code
        return int(code) if code is not None else None
    return None


def explain(err: BaseException) -> str:
    """The daemon's own words for an error, without the SDK's URL noise."""
    if isinstance(err, docker.errors.APIError) and err.explanation:
        return str(err.explanation)
    return str(err) or type(err).__name__


class DockerDaemon:
    """One daemon, reached through the Docker SDK.

    docker-py is synchronous, so every call runs on this object's own thread pool: the event
    loop never blocks, and a slow daemon cannot starve the loop's default executor, which
    other parts of the worker share. The client connects on first use (``version="auto"``
    asks the daemon which API it speaks), so a worker starts, and reports itself not ready,
    while the daemon is down, and reconnects by itself when it is back.
    """

    def __init__(self, *, connect: Callable[[], Any], address: str, max_threads: int) -> None:
        self._connect = connect
        self._address = address
        self._lock = threading.Lock()
        self._client: Any = None
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_threads, thread_name_prefix="expbuild-docker"
        )
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    @property
    def is_local(self) -> bool:
        return is_local_address(self._address)

    def _api(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    self._client = self._connect()
                except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as err:
                    raise UnavailableError(
                        f"docker engine at {self._address} does not answer: {explain(err)}"
                    ) from err
            return self._client

    def _invoke(self, fn: Callable[[Any], T]) -> T:
        api = self._api()
        try:
            return fn(api)
        except requests.exceptions.ConnectionError as err:
            raise UnavailableError(f"docker engine at {self._address} does not answer: {err}") from err

    async def call(self, fn: Callable[[Any], T]) -> T:
        """Run ``fn(api)`` (``api`` is a ``docker.APIClient``) on the pool; daemon errors pass through."""
        if self._closed:
            raise UnavailableError(f"docker engine connection to {self._address} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._invoke, fn)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking local work (file trees, tar streams) on the same pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, functools.partial(fn, *args))

    def close(self) -> None:
        """Stop taking calls and release the pool and the client; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
