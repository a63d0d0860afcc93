"""The worker's errors worded as google.rpc statuses with details, as REAPI clients read them."""

from __future__ import annotations

import logging

from grpc_status import rpc_status

from expbuild_worker.frontdoors import _grpc
from expbuild_worker.frontdoors._remote_actions import (
    TRAILER_DETAIL_BYTES,
    error_to_status,
)

_log = logging.getLogger(__name__)

Context = _grpc.Context


async def abort(context: Context, err: BaseException) -> None:
    """End the RPC with ``err``'s status, details in the ``grpc-status-details-bin`` trailer."""
    status = error_to_status(err, max_detail_bytes=TRAILER_DETAIL_BYTES)
    await context.abort_with_status(rpc_status.to_status(status))


maps_errors = _grpc.ErrorMapping(abort)
"""Handler decorator: any error ends the RPC with its google.rpc status and details (``abort``)."""
send = _grpc.send
