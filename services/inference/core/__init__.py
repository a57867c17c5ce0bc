"""Pure inference logic: scheduling, KV slot bookkeeping, fair prefill, the engine loop.

Nothing here imports grpc, generated protobuf code or llama_cpp; the model is
reached through the ``Backend`` protocol in ``core.backend``.
"""
