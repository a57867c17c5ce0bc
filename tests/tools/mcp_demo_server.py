"""A small MCP server over stdio, started by the tests as a real child process."""
from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations

server = MCPServer("demo")


@server.tool(annotations=ToolAnnotations(read_only_hint=True, idempotent_hint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool(name="shout.text")
def shout(text: str) -> str:
    """Upper-case the text (the dot makes the name need normalising)."""
    return text.upper()


@server.tool()
def whoami() -> str:
    """The pid of this server, to tell restarts apart."""
    return str(os.getpid())


@server.tool()
def fail(message: str) -> str:
    """Always reports an error."""
    raise ToolError(message)


if __name__ == "__main__":
    server.run("stdio")
