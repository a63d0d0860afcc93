"""The gRPC front door for expbuild.worker.v1: server factory, servicer, status mapping."""

from expbuild_worker.server._app import RunningServer, start_server

__all__ = ["RunningServer", "start_server"]
