"""llmesh policy service: the exec-policy and audit service."""
