"""The Remote Execution API front door: Execution, ActionCache, CAS, ByteStream, Capabilities.

What REAPI actions and results mean in engine terms (shared with the bot) lives in
``frontdoors/_remote_actions``; here is what is this front door's own: the services, resource
names, and how it words errors on the wire."""

from expbuild_worker.frontdoors.reapi._action_cache import referenced_blobs
from expbuild_worker.frontdoors.reapi._capabilities import server_capabilities
from expbuild_worker.frontdoors.reapi._errors import abort, maps_errors, send
from expbuild_worker.frontdoors.reapi._names import check_instance
from expbuild_worker.frontdoors.reapi._services import (
    ReapiStorageServices,
    batch_limit,
    build_reapi_storage_services,
)

__all__ = [
    "ReapiStorageServices",
    "abort",
    "batch_limit",
    "build_reapi_storage_services",
    "check_instance",
    "maps_errors",
    "referenced_blobs",
    "send",
    "server_capabilities",
]
