"""llmesh orchestrator service: the agent orchestrator."""
