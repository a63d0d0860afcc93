"""Capabilities.GetCapabilities: what this server serves, built once from its parameters."""

from __future__ import annotations

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.api.reapi import remote_execution_pb2_grpc as re_grpc
from expbuild_worker.api.reapi import semver_pb2
from expbuild_worker.frontdoors.reapi._errors import Context, maps_errors
from expbuild_worker.frontdoors.reapi._names import check_instance

LOW_API_VERSION = (2, 0)
HIGH_API_VERSION = (2, 3)
"""2.3 is the newest version whose fields this server fills (ExecutionCapabilities.digest_functions)."""


def _semver(version: tuple[int, int]) -> semver_pb2.SemVer:
    return semver_pb2.SemVer(major=version[0], minor=version[1])


def server_capabilities(*, exec_enabled: bool, max_batch_total_size_bytes: int) -> re_pb.ServerCapabilities:
    """SHA-256 only, an updatable action cache, no compression, no absolute symlinks.

    ``max_batch_total_size_bytes`` is the most blob bytes one BatchUpdateBlobs or BatchReadBlobs
    may carry (the server's message limit less room for the message's own fields).
    """
    sha256 = re_pb.DigestFunction.SHA256
    return re_pb.ServerCapabilities(
        cache_capabilities=re_pb.CacheCapabilities(
            digest_functions=[sha256],
            action_cache_update_capabilities=re_pb.ActionCacheUpdateCapabilities(update_enabled=True),
            max_batch_total_size_bytes=max_batch_total_size_bytes,
            symlink_absolute_path_strategy=re_pb.SymlinkAbsolutePathStrategy.DISALLOWED,
            supported_compressors=[re_pb.Compressor.IDENTITY],
        ),
        execution_capabilities=re_pb.ExecutionCapabilities(
            exec_enabled=exec_enabled, digest_function=sha256, digest_functions=[sha256]
        ),
        deprecated_api_version=_semver(LOW_API_VERSION),
        low_api_version=_semver(LOW_API_VERSION),
        high_api_version=_semver(HIGH_API_VERSION),
    )


class CapabilitiesServicer(re_grpc.CapabilitiesServicer):
    """Answers with the capabilities it was built with, for its one instance name."""

    def __init__(self, *, instance_name: str, capabilities: re_pb.ServerCapabilities) -> None:
        self._instance = instance_name
        self._capabilities = capabilities

    @maps_errors
    async def GetCapabilities(
        self, request: re_pb.GetCapabilitiesRequest, context: Context
    ) -> re_pb.ServerCapabilities:
        check_instance(request.instance_name, self._instance)
        return self._capabilities
