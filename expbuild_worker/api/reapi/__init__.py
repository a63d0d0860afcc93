"""REAPI v2, ByteStream, SemVer: import ``*_pb2`` (messages) and ``*_pb2_grpc`` (stubs)."""
