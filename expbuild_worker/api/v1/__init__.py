"""expbuild.worker.v1: ``worker_pb2`` (messages), ``worker_pb2_grpc`` (stubs), ``digests`` (Digest ↔ wire)."""
