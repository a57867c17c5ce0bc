"""Plumbing shared by every llmesh service: settings, errors, the gRPC server
runtime, telemetry, logging and clients."""
