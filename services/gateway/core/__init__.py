"""Pure logic of the REST layer: no grpc, *_pb2 or HTTP framework imports."""
