"""Hosting only: the gRPC server for the worker's front doors, health, reflection, shutdown."""

from expbuild_worker.server._app import RunningServer, start_server

__all__ = ["RunningServer", "start_server"]
