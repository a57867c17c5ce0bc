"""Outbound clients (gRPC) and in-memory stand-ins behind the core's ports."""
