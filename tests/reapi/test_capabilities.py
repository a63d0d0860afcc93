"""Capabilities.GetCapabilities: what clients such as Bazel decide their protocol from."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest
from _reapi_support import MAX_MESSAGE, ReapiServer
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from expbuild_worker.api.reapi import remote_execution_pb2 as re_pb
from expbuild_worker.frontdoors.reapi import batch_limit


def test_capabilities_fields(reapi: ReapiServer) -> None:
    """Clients pick SHA-256, batch sizes, compression and API version from exactly these fields."""
    caps = reapi.capabilities.GetCapabilities(re_pb.GetCapabilitiesRequest(instance_name=""))
    cache = caps.cache_capabilities
    assert list(cache.digest_functions) == [re_pb.DigestFunction.SHA256]
    assert cache.action_cache_update_capabilities.update_enabled
    assert cache.max_batch_total_size_bytes == batch_limit(MAX_MESSAGE)
    assert 0 < cache.max_batch_total_size_bytes < MAX_MESSAGE
    assert cache.symlink_absolute_path_strategy == re_pb.SymlinkAbsolutePathStrategy.DISALLOWED
    assert list(cache.supported_compressors) == [re_pb.Compressor.IDENTITY]
    execution = caps.execution_capabilities
    assert execution.exec_enabled
    assert execution.digest_function == re_pb.DigestFunction.SHA256
    assert list(execution.digest_functions) == [re_pb.DigestFunction.SHA256]
    assert (caps.low_api_version.major, caps.low_api_version.minor) == (2, 0)
    assert (caps.high_api_version.major, caps.high_api_version.minor) == (2, 3)


def test_exec_disabled_is_reported(start_reapi: Callable[..., ReapiServer]) -> None:
    """A cache-only server must say so, or clients would send it Execute calls."""
    reapi = start_reapi(exec_enabled=False)
    caps = reapi.capabilities.GetCapabilities(re_pb.GetCapabilitiesRequest())
    assert not caps.execution_capabilities.exec_enabled
    assert caps.cache_capabilities.action_cache_update_capabilities.update_enabled


def test_unknown_instance_is_refused_by_name(start_reapi: Callable[..., ReapiServer]) -> None:
    """A client configured with the wrong instance name learns which name is wrong, not a silent miss."""
    reapi = start_reapi(instance_name="main")
    assert reapi.capabilities.GetCapabilities(re_pb.GetCapabilitiesRequest(instance_name="main"))
    with pytest.raises(grpc.RpcError) as info:
        reapi.capabilities.GetCapabilities(re_pb.GetCapabilitiesRequest(instance_name="other"))
    call = info.value
    assert call.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'other'" in call.details()
    status = rpc_status.from_call(call)
    bad = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad)
    assert [v.field for v in bad.field_violations] == ["instance_name"]
