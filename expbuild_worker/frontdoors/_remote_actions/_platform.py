"""REAPI platform properties → which executor and image run an action; what cannot be given is refused."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from dataclasses import dataclass, field

from expbuild_worker.errors import InvalidRequestError, PreconditionError
from expbuild_worker.model import ExecutorSelector, IsolationLevel

CONTAINER_IMAGE = "container-image"
"""``docker://IMAGE``: run in a container of IMAGE (checked against the Docker executor's allowlist)."""
EXECUTOR = "executor"
"""An executor's name as the worker's capabilities list it (``host``, ``docker`` …)."""
ISOLATION = "isolation"
"""The least isolation the action accepts: ``host``, ``namespace-sandbox``, ``container``, ``virtualized``."""
RECYCLE_RUNNER = "recycle-runner"
"""``true``: the action may run in a recycled pool container (the executor reads it as passed)."""
OS_FAMILY = "OSFamily"
ISA = "ISA"

_ISOLATION_NAMES = {
    "host": IsolationLevel.HOST,
    "namespace-sandbox": IsolationLevel.NAMESPACE_SANDBOX,
    "container": IsolationLevel.CONTAINER,
    "virtualized": IsolationLevel.VIRTUALIZED,
}
_ISA_NAMES = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "aarch64", "arm64": "aarch64"}


def machine_isa() -> str:
    """This machine's instruction set as schedulers spell it (``x86-64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return _ISA_NAMES.get(machine, machine)


@dataclass(frozen=True, slots=True)
class PlatformChoice:
    """What an action's platform asks of the worker, in engine terms."""

    executor: ExecutorSelector = field(default_factory=ExecutorSelector)
    image: str | None = None
    recycle_runner: bool = False


def choose(properties: Iterable[tuple[str, str]], field_name: str = "platform") -> PlatformChoice:
    """Read the properties of an Action's (and its Command's) platform.

    Understood: ``container-image`` (``docker://IMAGE``), ``executor``, ``isolation``, and
    ``OSFamily``/``ISA`` when they match this machine. Anything else is FAILED_PRECONDITION
    naming it: a worker that ignores a platform it cannot give runs an action somewhere its
    author did not mean it to run.
    """
    seen: dict[str, str] = {}
    for name, value in properties:
        if name in seen and seen[name] != value:
            raise InvalidRequestError(
                f"{field_name}.properties: {name!r} is given twice ({seen[name]!r} and {value!r})"
            )
        seen[name] = value
    unknown = sorted(set(seen) - {CONTAINER_IMAGE, EXECUTOR, ISOLATION, OS_FAMILY, ISA, RECYCLE_RUNNER})
    if unknown:
        raise PreconditionError(
            f"{field_name}.properties: this worker cannot honour {', '.join(repr(n) for n in unknown)}; "
            f"it understands {CONTAINER_IMAGE}, {EXECUTOR}, {ISOLATION}, {OS_FAMILY}, {ISA} "
            f"and {RECYCLE_RUNNER}"
        )
    if OS_FAMILY in seen and seen[OS_FAMILY].lower() != platform.system().lower():
        raise PreconditionError(
            f"{field_name}.properties: {OS_FAMILY} {seen[OS_FAMILY]!r} is not this worker's "
            f"({platform.system().lower()})"
        )
    if ISA in seen and _ISA_NAMES.get(seen[ISA].lower(), seen[ISA].lower()) != machine_isa():
        raise PreconditionError(
            f"{field_name}.properties: {ISA} {seen[ISA]!r} is not this worker's ({machine_isa()})"
        )
    image: str | None = None
    if CONTAINER_IMAGE in seen:
        scheme, sep, image = seen[CONTAINER_IMAGE].partition("://")
        if not sep or scheme != "docker" or not image:
            raise InvalidRequestError(
                f"{field_name}.properties: {CONTAINER_IMAGE} {seen[CONTAINER_IMAGE]!r} is not docker://IMAGE"
            )
    minimum: IsolationLevel | None = None
    if ISOLATION in seen:
        minimum = _ISOLATION_NAMES.get(seen[ISOLATION])
        if minimum is None:
            raise InvalidRequestError(
                f"{field_name}.properties: {ISOLATION} {seen[ISOLATION]!r} is not one of "
                f"{', '.join(_ISOLATION_NAMES)}"
            )
    if image is not None and minimum is None and EXECUTOR not in seen:
        minimum = IsolationLevel.CONTAINER  # an image means a container, whichever executor gives one
    recycle = seen.get(RECYCLE_RUNNER, "false").lower()
    if recycle not in ("true", "false"):
        raise InvalidRequestError(
            f"{field_name}.properties: {RECYCLE_RUNNER} {recycle!r} is not true or false"
        )
    return PlatformChoice(
        executor=ExecutorSelector(name=seen.get(EXECUTOR) or None, min_isolation=minimum),
        image=image,
        recycle_runner=recycle == "true",
    )
