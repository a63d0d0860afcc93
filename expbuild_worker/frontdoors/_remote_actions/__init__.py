"""REAPI actions and results in engine terms, shared by the ways in that speak them (the REAPI
front door and the bot): digests on the wire, an Action read from a CAS, platform properties,
the ActionResult of an engine result, and errors as google.rpc statuses."""

from expbuild_worker.frontdoors._remote_actions._digests import (
    blob_subject,
    check_digest_function,
    check_sha256,
    check_size,
    digest_from_pb,
    digest_to_pb,
    digests_from_pb,
)
from expbuild_worker.frontdoors._remote_actions._load import LoadedAction, load_action, read_action, read_blob
from expbuild_worker.frontdoors._remote_actions._platform import (
    CONTAINER_IMAGE,
    EXECUTOR,
    ISA,
    ISOLATION,
    OS_FAMILY,
    PlatformChoice,
    choose,
    machine_isa,
)
from expbuild_worker.frontdoors._remote_actions._results import action_result, cacheable, execute_response
from expbuild_worker.frontdoors._remote_actions._status import (
    TRAILER_DETAIL_BYTES,
    OutOfRangeError,
    error_to_status,
)

__all__ = [
    "CONTAINER_IMAGE",
    "EXECUTOR",
    "ISA",
    "ISOLATION",
    "OS_FAMILY",
    "TRAILER_DETAIL_BYTES",
    "LoadedAction",
    "OutOfRangeError",
    "PlatformChoice",
    "action_result",
    "blob_subject",
    "cacheable",
    "check_digest_function",
    "check_sha256",
    "check_size",
    "choose",
    "digest_from_pb",
    "digest_to_pb",
    "digests_from_pb",
    "error_to_status",
    "execute_response",
    "load_action",
    "machine_isa",
    "read_action",
    "read_blob",
]
