"""The Remote Execution API front door: its storage services, digests and error wording."""

from expbuild_worker.frontdoors.reapi._action_cache import referenced_blobs
from expbuild_worker.frontdoors.reapi._capabilities import server_capabilities
from expbuild_worker.frontdoors.reapi._digests import (
    blob_subject,
    check_digest_function,
    digest_from_pb,
    digest_to_pb,
    digests_from_pb,
)
from expbuild_worker.frontdoors.reapi._errors import (
    OutOfRangeError,
    abort,
    error_to_status,
    maps_errors,
    send,
)
from expbuild_worker.frontdoors.reapi._names import check_instance
from expbuild_worker.frontdoors.reapi._services import (
    ReapiStorageServices,
    batch_limit,
    build_reapi_storage_services,
)

__all__ = [
    "OutOfRangeError",
    "ReapiStorageServices",
    "abort",
    "batch_limit",
    "blob_subject",
    "build_reapi_storage_services",
    "check_digest_function",
    "check_instance",
    "digest_from_pb",
    "digest_to_pb",
    "digests_from_pb",
    "error_to_status",
    "maps_errors",
    "referenced_blobs",
    "send",
    "server_capabilities",
]
