"""MCP servers over stdio: their tools join the registry and run through the executor.

Each server is one long-lived child process with one MCP ``ClientSession``,
owned by a background task (anyio scopes must be entered and left by the same
task). Tool listings are cached in the registry and refreshed every
``refresh_s``; a server that died is reconnected at the next refresh or call.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, MCPError, StdioServerParameters, stdio_client
from mcp import types as mcp_types

from services.tools.core import names
from services.tools.core.model import RiskLevel, ToolContext, ToolFailure, ToolOutput, ToolSpec
from services.tools.core.output import CapturedText
from services.tools.core.registry import ToolRegistry

log = logging.getLogger("llmesh.tools.mcp")

CONNECT_TIMEOUT_S = 20.0
_TRANSPORT_ERRORS = (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream, OSError, EOFError)


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    timeout_ms: int = 30_000


def load_mcp_config(path: str) -> list[McpServerConfig]:
    """``{"servers": {"<name>": {"command": ..., "args": [...], "env": {...}, "cwd": ..., "timeout_ms": ...}}}``"""
    if not path:
        return []
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    configs = []
    for name, entry in sorted(raw.get("servers", {}).items()):
        configs.append(McpServerConfig(
            name=name, command=entry["command"], args=tuple(entry.get("args", ())),
            env=dict(entry.get("env", {})), cwd=entry.get("cwd"), timeout_ms=int(entry.get("timeout_ms", 30_000))))
    return configs


class McpServerConnection:
    def __init__(self, config: McpServerConfig) -> None:
        self.config = config
        self.session: ClientSession | None = None
        self.server_version = ""
        self._stop = asyncio.Event()
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    @property
    def connected(self) -> bool:
        return self.session is not None and self._task is not None and not self._task.done()

    async def connect(self) -> None:
        await self.close()
        self._stop, self._ready, self._error = asyncio.Event(), asyncio.Event(), None
        self._task = asyncio.create_task(self._own_session(), name=f"mcp:{self.config.name}")
        try:
            await asyncio.wait_for(self._ready.wait(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            await self.close()
            raise ToolFailure(f"MCP server {self.config.name!r} did not initialise in {CONNECT_TIMEOUT_S:g}s",
                              reason="MCP_UNAVAILABLE") from None
        if self.session is None:
            raise ToolFailure(f"MCP server {self.config.name!r} failed to start: {self._error}",
                              reason="MCP_UNAVAILABLE")

    async def _own_session(self) -> None:
        params = StdioServerParameters(command=self.config.command, args=list(self.config.args),
                                       env=self.config.env or None, cwd=self.config.cwd)
        try:
            async with stdio_client(params, errlog=sys.stderr) as (read, write):
                async with ClientSession(read, write) as session:
                    init = await session.initialize()
                    self.server_version = init.server_info.version or ""
                    self.session = session
                    self._ready.set()
                    await self._stop.wait()
        except Exception as exc:
            self._error = exc
            log.warning("MCP server %s stopped: %s", self.config.name, exc)
        finally:
            self.session = None
            self._ready.set()

    async def list_tools(self) -> list[mcp_types.Tool]:
        session = await self._live_session()
        tools: list[mcp_types.Tool] = []
        cursor: str | None = None
        while True:
            params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            tools.extend(page.tools)
            cursor = page.next_cursor
            if not cursor:
                return tools

    async def call(self, tool: str, arguments: dict[str, Any], timeout_s: float) -> mcp_types.CallToolResult:
        session = await self._live_session()
        try:
            result = await session.call_tool(tool, arguments, read_timeout_seconds=timeout_s)
        except _TRANSPORT_ERRORS as exc:
            raise ToolFailure(f"MCP server {self.config.name!r} connection lost: {exc!r}",
                              reason="MCP_UNAVAILABLE") from None
        assert isinstance(result, mcp_types.CallToolResult)
        return result

    async def _live_session(self) -> ClientSession:
        if not self.connected:
            await self.connect()
        assert self.session is not None
        return self.session

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), 5.0)
        except (TimeoutError, asyncio.CancelledError):
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _risk(annotations: mcp_types.ToolAnnotations | None) -> RiskLevel:
    if annotations is None:
        return RiskLevel.WRITE
    if annotations.read_only_hint:
        return RiskLevel.READ_ONLY
    if annotations.destructive_hint:
        return RiskLevel.DANGEROUS
    return RiskLevel.WRITE


def result_to_output(result: mcp_types.CallToolResult, cap: int) -> ToolOutput:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        parts.append(text if isinstance(text, str) else f"[{block.type} content]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, sort_keys=True))
    content = CapturedText.of("\n".join(parts), cap)
    if result.is_error:
        return ToolOutput(ok=False, exit_code=1, content=content, error_reason="MCP_TOOL_ERROR",
                          error_message=content.text[:500])
    return ToolOutput(ok=True, content=content)


class McpHub:
    """Every configured MCP server, its tools kept in the registry."""

    def __init__(self, configs: list[McpServerConfig], registry: ToolRegistry, refresh_s: float) -> None:
        self.connections = {c.name: McpServerConnection(c) for c in configs}
        self.registry = registry
        self.refresh_s = refresh_s
        self._stop = asyncio.Event()
        self._refresher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        # A server that does not start must not keep the service down; it is retried on refresh.
        await asyncio.gather(*(self.refresh(name) for name in self.connections))
        if self.connections and self.refresh_s > 0:
            self._refresher = asyncio.create_task(self._refresh_periodically(), name="mcp-refresh")

    async def refresh(self, server: str) -> list[ToolSpec]:
        connection = self.connections[server]
        try:
            tools = await connection.list_tools()
        except (ToolFailure, MCPError, *_TRANSPORT_ERRORS) as exc:
            log.warning("cannot list tools of MCP server %s: %s", server, exc)
            return []
        specs = [(self._spec(connection, tool), names.mcp_qualified(server, tool.name)) for tool in tools]
        return self.registry.replace_source(f"mcp:{server}", specs)

    def _spec(self, connection: McpServerConnection, tool: mcp_types.Tool) -> ToolSpec:
        schema = tool.input_schema or {"type": "object"}
        schema_hash = hashlib.sha256(json.dumps(schema, sort_keys=True).encode()).hexdigest()[:8]
        annotations = tool.annotations
        idempotent = bool(annotations and annotations.idempotent_hint)
        original = tool.name

        async def handler(arguments: dict[str, Any], ctx: ToolContext) -> ToolOutput:
            try:
                result = await connection.call(original, arguments, ctx.timeout_s)
            except MCPError as exc:
                return ToolOutput(ok=False, exit_code=1, error_reason="MCP_ERROR", error_message=str(exc))
            return result_to_output(result, ctx.output_cap_bytes)

        return ToolSpec(
            name=original, original_name=original, description=tool.description or "", parameters_schema=schema,
            handler=handler, version=f"{connection.server_version or '0'}+{schema_hash}", risk_level=_risk(annotations),
            idempotent=idempotent, retryable=idempotent, timeout_ms=connection.config.timeout_ms,
            source=f"mcp:{connection.config.name}")

    async def _refresh_periodically(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.refresh_s)
                return
            for name in self.connections:
                await self.refresh(name)

    async def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            with contextlib.suppress(BaseException):
                await self._refresher
        for connection in self.connections.values():
            await connection.close()
