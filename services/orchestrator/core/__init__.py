"""Pure agent logic: no grpc, *_pb2, sqlalchemy or llama_cpp imports."""
