"""Outbound pieces of the tool executor: sandboxed shell, files, HTTP, MCP, policy."""
