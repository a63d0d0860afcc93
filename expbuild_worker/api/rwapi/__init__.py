"""Remote Workers API v1test2 (Bots, Worker): import ``*_pb2`` (messages) and ``*_pb2_grpc`` (stubs)."""
