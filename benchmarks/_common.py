"""What the benchmarks share: timing samples, interleaved probes, and a worker to measure."""

from __future__ import annotations

import asyncio
import inspect
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expbuild_worker.config import parse_config
from expbuild_worker.server import start_server


@dataclass(frozen=True)
class Timing:
    """Latency samples in seconds."""

    samples: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p90(self) -> float:
        return statistics.quantiles(self.samples, n=10)[-1]

    def row(self, name: str) -> str:
        return f"  {name:<52} median {self.median * 1e3:8.3f} ms   p90 {self.p90 * 1e3:8.3f} ms"


Probe = Callable[[], object]
"""One operation to time: a plain call, or a call returning an awaitable that is awaited."""


async def _once(probe: Probe) -> None:
    result = probe()
    if inspect.isawaitable(result):
        await result


async def interleaved(
    probes: dict[str, Probe], runs: int, *, warmup: int = 20, batch: int = 20
) -> dict[str, Timing]:
    """Time each probe ``runs`` times, in alternating batches, so that load from elsewhere on a
    shared machine falls on every probe alike instead of skewing whichever ran at the wrong moment."""
    for probe in probes.values():
        for _ in range(warmup):
            await _once(probe)
    samples: dict[str, list[float]] = {name: [] for name in probes}
    while len(samples[next(iter(probes))]) < runs:
        for name, probe in probes.items():
            for _ in range(min(batch, runs - len(samples[name]))):
                start = time.perf_counter()
                await _once(probe)
                samples[name].append(time.perf_counter() - start)
    return {name: Timing(values) for name, values in samples.items()}


def mb_s(seconds: float, n: int) -> str:
    return f"{n / seconds / 1e6:8.1f} MB/s ({n / (1 << 20):.0f} MiB in {seconds:.2f} s)"


def toml_of(config: dict[str, Any]) -> str:
    """A worker config as TOML; strings as JSON strings, which TOML reads the same."""
    lines: list[str] = []
    for table in ("server", "execution", "storage", "worker_api", "reapi", "metrics"):
        if table in config:
            lines.append(f"[{table}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in config[table].items()]
    for name, executor in config["executor"].items():
        lines.append(f"[executor.{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in executor.items()]
    return "\n".join(lines) + "\n"


@asynccontextmanager
async def child_target(argv: list[str], marker: str) -> AsyncIterator[str]:
    """Start a child that prints "<marker> HOST:PORT"; yield the target; stop it by its pid at the end."""
    proc = await asyncio.create_subprocess_exec(*argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if marker not in line:
            raise RuntimeError(f"child {argv[:4]} did not start: {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


@asynccontextmanager
async def worker_target(topology: str, config: dict[str, Any], work: Path) -> AsyncIterator[str]:
    """The worker in this process, or (``subprocess``) as ``expbuild-worker serve`` in a child."""
    if topology == "subprocess":
        path = work / "worker.toml"
        path.write_text(toml_of(config))
        argv = [sys.executable, "-m", "expbuild_worker", "serve", "--config", str(path)]
        async with child_target(argv, "expbuild-worker listening on") as target:
            yield target
        return
    running = await start_server(parse_config(config, source="<bench>"))
    try:
        yield running.target
    finally:
        await running.stop(0)


def work_directory(prefix: str) -> Path:
    """A fresh temporary directory the worker's action user can search (mkdtemp makes it 0700;
    a root worker runs host actions as an unprivileged user who must reach their directories)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o711)
    return path
