"""llmesh tools service: the tool executor."""
