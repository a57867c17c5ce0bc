"""llmesh inference service: the llama.cpp inference node."""
