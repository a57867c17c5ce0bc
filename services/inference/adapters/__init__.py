"""Backends behind ``core.backend.Backend`` (llama.cpp, synthetic) and device probes."""
