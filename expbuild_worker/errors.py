"""The worker's one error hierarchy; front doors map it to their wire statuses in one place."""

from __future__ import annotations

from collections.abc import Sequence

NAMED_IN_A_MESSAGE = 10
"""How many items (digests, fields) one error message names; the rest are counted."""


def name_some(items: Sequence[object], limit: int = NAMED_IN_A_MESSAGE) -> str:
    """The first ``limit`` of ``items`` for a message, then how many more there are."""
    named = ", ".join(str(item) for item in items[:limit])
    return named + (f" and {len(items) - limit} more" if len(items) > limit else "")


class WorkerError(Exception):
    """Base of every error the worker raises on purpose. The message is shown to clients."""


class InvalidRequestError(WorkerError):
    """The request is malformed; the message names the field and the problem."""


class AlreadyExistsError(WorkerError):
    """An action with this execution id is already queued or running."""


class NotFoundError(WorkerError):
    """The named execution or blob is unknown."""


class ResourceExhaustedError(WorkerError):
    """A queue or a cap is full (concurrency queue, output bytes, store space)."""


class PreconditionError(WorkerError):
    """The worker cannot run this action as asked (image missing, executor not ready)."""


class MissingBlobsError(PreconditionError):
    """Blobs an action needs are not in the store; ``digests`` lists exactly which (upload them again)."""

    def __init__(self, message: str, *, digests: tuple[object, ...]) -> None:
        super().__init__(message)
        self.digests = digests


class UnavailableError(WorkerError):
    """The worker is shutting down or a service it needs (a Docker daemon, say) does not answer."""


class ConfigError(WorkerError):
    """The configuration is invalid; the message names the file, the key and what was expected."""


class InternalError(WorkerError):
    """A fault inside the worker."""


class OutputLimitExceeded(Exception):
    """The outputs are more than a result may carry: too many bytes, entries or levels, or too long a path.

    Not a WorkerError: it never ends an RPC. Output collection (the engine's, or the Docker
    executor's archive I/O) raises it and the action ends with OUTPUT_LIMIT and this message.
    """
