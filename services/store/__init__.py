"""llmesh store service: the store."""
