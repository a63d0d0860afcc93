"""What the bot offers a scheduler: the primary device's properties and the worker's capacity."""

from __future__ import annotations

import platform
from collections.abc import Sequence

from expbuild_worker.api.rwapi import worker_pb2 as w_pb
from expbuild_worker.frontdoors._remote_actions import (
    CONTAINER_IMAGE,
    EXECUTOR,
    ISA,
    ISOLATION,
    OS_FAMILY,
    machine_isa,
)
from expbuild_worker.model import ExecutorCapabilities, IsolationLevel

CAPACITY = "capacity"
"""The Worker config key BuildGrid reads for how many leases a bot runs at once (default 1)."""

_ISOLATION_NAMES = {
    IsolationLevel.HOST: "host",
    IsolationLevel.NAMESPACE_SANDBOX: "namespace-sandbox",
    IsolationLevel.CONTAINER: "container",
    IsolationLevel.VIRTUALIZED: "virtualized",
}


def offered_properties(
    executors: Sequence[ExecutorCapabilities], container_images: Sequence[str]
) -> list[tuple[str, str]]:
    """Every (key, value) pair an action's platform may ask of this bot, as the REAPI front door reads them.

    A scheduler that matches by subsets (BuildGrid) leases an action here only when each of its
    platform properties is among these pairs, so a key appears once per value that would be
    honoured: ``isolation`` for every level up to the strongest executor's (an action asking for
    less is served by the least that suffices), ``executor`` for every executor, and
    ``container-image`` for each image listed (``docker://IMAGE``) when an executor isolates by
    container or more. Executors that are not ready are left out.
    """
    ready = [caps for caps in executors if caps.readiness.ready]
    pairs: list[tuple[str, str]] = [(OS_FAMILY, platform.system().lower()), (ISA, machine_isa())]
    strongest = max((caps.isolation for caps in ready), default=None)
    if strongest is not None:
        pairs += [(ISOLATION, name) for level, name in _ISOLATION_NAMES.items() if level <= strongest]
    pairs += [(EXECUTOR, caps.name) for caps in ready]
    if strongest is not None and strongest >= IsolationLevel.CONTAINER:
        pairs += [(CONTAINER_IMAGE, f"docker://{image}") for image in dict.fromkeys(container_images)]
    return pairs


def worker_message(bot_id: str, properties: Sequence[tuple[str, str]], capacity: int) -> w_pb.Worker:
    """The Worker a BotSession carries: one device (this machine, named by the bot id) and the capacity."""
    device = w_pb.Device(handle=bot_id)
    for key, value in properties:
        device.properties.add(key=key, value=value)
    worker = w_pb.Worker(devices=[device])
    worker.configs.add(key=CAPACITY, value=str(capacity))
    return worker
