"""Pure balancing logic: node state, scoring, affinity, ejection (no grpc)."""
