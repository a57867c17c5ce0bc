"""http_fetch: GET a URL (off by default; the sandboxed shell has no network)."""
from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from typing import Any

from services.common.errors import InvalidArgument
from services.tools.core.model import RiskLevel, ToolContext, ToolFailure, ToolOutput, ToolSpec
from services.tools.core.output import CapturedText

FETCH_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["url"],
    "properties": {
        "url": {"type": "string", "pattern": "^https?://", "maxLength": 4096},
        "headers": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


class HttpFetchTool:
    def __init__(self, max_bytes: int, timeout_ms: int) -> None:
        self.max_bytes = max_bytes
        self.timeout_ms = timeout_ms

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name="http_fetch", handler=self.fetch, risk_level=RiskLevel.WRITE, idempotent=True, retryable=True,
            timeout_ms=self.timeout_ms, parameters_schema=FETCH_SCHEMA,
            description="HTTP GET a URL; returns the status and the body as text.")

    async def fetch(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        return await asyncio.to_thread(self._fetch_sync, args, ctx)

    def _fetch_sync(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        request = urllib.request.Request(args["url"], headers=args.get("headers", {}), method="GET")
        try:
            with urllib.request.urlopen(request, timeout=ctx.timeout_s) as response:
                body = response.read(self.max_bytes + 1)
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(self.max_bytes + 1), exc.code
        except ValueError as exc:
            raise InvalidArgument(f"arguments.url: {exc}", field="arguments.url") from None
        except (urllib.error.URLError, OSError) as exc:
            # Connection refused, DNS failure, reset: the remote may come back.
            raise ToolFailure(f"fetch failed: {exc}", reason="FETCH_FAILED") from None
        content = CapturedText.of(body[: self.max_bytes], ctx.output_cap_bytes)
        ok = 200 <= status < 400
        return ToolOutput(ok=ok, exit_code=0 if ok else status, content=content,
                          error_reason="" if ok else "HTTP_STATUS",
                          error_message="" if ok else f"HTTP status {status}")
