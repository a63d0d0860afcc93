"""A pass-through Executor that decorators extend by overriding ``execute``."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

from expbuild_worker.execution.executor import Command, Executor, StopSignal
from expbuild_worker.model import (
    ExecutorCapabilities,
    ExecutorEvent,
    IsolationLevel,
    Readiness,
    ResourceLimits,
    WarmupReport,
)


class ExecutorDecorator:
    """Delegates everything to ``inner``; subclasses change only what they are about."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def isolation(self) -> IsolationLevel:
        return self.inner.isolation

    async def readiness(self) -> Readiness:
        return await self.inner.readiness()

    async def capabilities(self) -> ExecutorCapabilities:
        return await self.inner.capabilities()

    async def warmup(self, images: Sequence[str]) -> WarmupReport:
        return await self.inner.warmup(images)

    def check(self, limits: ResourceLimits, image: str | None) -> None:
        self.inner.check(limits, image)

    def execute(self, command: Command, stop: StopSignal) -> AsyncGenerator[ExecutorEvent, None]:
        return self.inner.execute(command, stop)

    async def close(self) -> None:
        await self.inner.close()
