"""Pure logic of the tool executor: no grpc, *_pb2 or subprocess plumbing."""
