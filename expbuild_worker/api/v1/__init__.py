"""expbuild.worker.v1: import ``worker_pb2`` (messages) and ``worker_pb2_grpc`` (stubs)."""
