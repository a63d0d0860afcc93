"""Which images an action may use, and making them present according to the pull policy."""

from __future__ import annotations

import asyncio
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import docker.errors
from docker.utils import parse_repository_tag

from expbuild_worker.config import PullPolicy
from expbuild_worker.errors import PreconditionError
from expbuild_worker.execution.docker._daemon import DockerDaemon, explain, status_of


def normalize(image: str) -> str:
    """``name`` and ``name:latest`` are the same image; digests and explicit tags stay as they are."""
    if "@" in image:
        return image
    _, tag = parse_repository_tag(image)
    return image if tag else f"{image}:latest"


@dataclass(frozen=True, slots=True)
class WarmupOutcome:
    present: tuple[str, ...]
    problems: tuple[str, ...]


class ImagePolicy:
    """Resolves an action's image and applies the pull policy.

    An action may name the configured image, a warm-up image, or one matching an
    ``allowed_images`` pattern (shell-style, e.g. ``registry.example/tools/*``); anything else is
    refused. Presence is never checked on the hot path: the create call itself reports a
    missing image, and only then does ``if-not-present`` pull (``never`` refuses). ``always``
    pulls before every create; concurrent pulls of one image share a single daemon call.
    """

    def __init__(
        self,
        *,
        daemon: DockerDaemon,
        executor: str,
        default_image: str,
        allowed_images: Sequence[str],
        warmup_images: Sequence[str],
        pull_policy: PullPolicy,
    ) -> None:
        self._daemon = daemon
        self._executor = executor
        self._default = default_image
        self._exact = {normalize(i) for i in (default_image, *warmup_images) if i}
        self._patterns = tuple(allowed_images)
        self.warmup_images = tuple(i for i in (default_image, *warmup_images) if i)
        self.pull_policy: PullPolicy = pull_policy
        self._pulls: dict[str, asyncio.Future[None]] = {}

    def allowed(self, image: str) -> bool:
        return normalize(image) in self._exact or any(
            fnmatch.fnmatchcase(image, p) or fnmatch.fnmatchcase(normalize(image), p) for p in self._patterns
        )

    def resolve(self, requested: str | None) -> str:
        """The image to run: the requested one if allowed, else the configured default."""
        if not requested:
            if not self._default:
                raise PreconditionError(
                    f"container_image: executor {self._executor!r} has no configured image and the "
                    "action names none"
                )
            return self._default
        if not self.allowed(requested):
            raise PreconditionError(
                f"container_image: {requested[:300]!r} is not allowed on executor {self._executor!r}; "
                "configure it as image, in warmup_images or in allowed_images"
            )
        return requested

    async def on_missing(self, image: str) -> None:
        """The daemon said ``image`` is missing: pull it (``if-not-present``) or refuse."""
        if self.pull_policy == "never":
            raise PreconditionError(
                f"image {image!r} is not present on the engine and executor {self._executor!r} "
                "has pull_policy 'never'"
            )
        await self.pull(image)

    async def pull(self, image: str) -> None:
        """Pull ``image`` once even when many actions ask at the same time; PreconditionError on failure."""
        key = normalize(image)
        pending = self._pulls.get(key)
        if pending is None:
            pending = asyncio.ensure_future(self._pull(image))
            self._pulls[key] = pending
            pending.add_done_callback(lambda _: self._pulls.pop(key, None))
        await asyncio.shield(pending)

    async def _pull(self, image: str) -> None:
        repository, tag = parse_repository_tag(image)

        def pull(api: Any) -> None:
            api.pull(repository, tag=tag or "latest")

        try:
            await self._daemon.call(pull)
        except docker.errors.DockerException as err:
            raise PreconditionError(f"image {image!r} could not be pulled: {explain(err)}") from err

    async def present(self, image: str) -> bool:
        try:
            await self._daemon.call(lambda api: api.inspect_image(image))
        except Exception as err:
            if status_of(err) == 404:
                return False
            raise
        return True

    async def warmup(self, extra: Sequence[str]) -> WarmupOutcome:
        """Make the configured and ``extra`` (allowed) images present per the pull policy."""
        present: list[str] = []
        problems: list[str] = []
        for image in dict.fromkeys((*self.warmup_images, *extra)):
            if not self.allowed(image):
                problems.append(f"{image}: not allowed on this executor")
                continue
            try:
                if self.pull_policy == "always" or (
                    self.pull_policy == "if-not-present" and not await self.present(image)
                ):
                    await self.pull(image)
                if await self.present(image):
                    present.append(image)
                else:
                    problems.append(f"{image}: not present (pull_policy 'never')")
            except PreconditionError as err:
                problems.append(str(err))
        return WarmupOutcome(tuple(present), tuple(problems))
