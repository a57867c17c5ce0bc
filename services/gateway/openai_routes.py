"""HTTP handlers of the OpenAI-compatible endpoints (thin: JSON in, core, JSON/SSE out)."""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common import errors
from services.gateway.core.json_body import loads_body
from services.gateway.core.openai_compat import CompletionPlan, OpenAICompat, dumps, plan_chat, plan_completion
from services.gateway.core.openai_embeddings import OpenAIEmbeddings, plan_embedding
from services.gateway.core.ports import EmbeddingSource
from services.gateway.http_api import forwarded_metadata, read_body
from services.gateway.http_errors import error_payload, openai_error_response


class OpenAIRoutes:
    def __init__(self, compat: OpenAICompat | None, max_body_bytes: int) -> None:
        self.compat = compat
        self.max_body_bytes = max_body_bytes

    async def _body(self, request: Request) -> Any:
        raw = await read_body(request, self.max_body_bytes)
        errors.require(bool(raw.strip()), "body", "expected a JSON object")
        return loads_body(raw)

    def _compat(self) -> OpenAICompat:
        if self.compat is None:
            raise errors.Unavailable("no inference backend is configured", reason="BACKEND_NOT_CONFIGURED")
        return self.compat

    async def chat_completions(self, request: Request) -> Response:
        return await self._serve(request, plan_chat, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._serve(request, plan_completion, "completion")

    async def embeddings(self, request: Request) -> Response:
        try:
            compat = self._compat()
            source = compat.generator
            if not isinstance(source, EmbeddingSource):
                raise errors.Unimplemented("the inference backend does not serve embeddings",
                                           reason="EMBEDDINGS_NOT_SERVED")
            plan = plan_embedding(await self._body(request))
            principal = getattr(request.state, "principal", None)
            result = await OpenAIEmbeddings(source, compat.catalog).create(
                plan, tenant_id=principal.tenant_id if principal else "", metadata=tuple(forwarded_metadata(request)))
        except errors.DomainError as exc:
            return openai_error_response(exc)
        return JSONResponse(result)

    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse(await self._compat().models())
        except errors.DomainError as exc:
            return openai_error_response(exc)

    async def _serve(self, request: Request, planner: Any, kind: str) -> Response:
        try:
            compat = self._compat()
            plan: CompletionPlan = planner(await self._body(request))
            principal = getattr(request.state, "principal", None)
            plan = dataclasses.replace(plan, params=dataclasses.replace(
                plan.params, metadata=tuple(forwarded_metadata(request)),
                tenant_id=principal.tenant_id if principal else ""))
            if not plan.stream:
                result = await (compat.chat(plan) if kind == "chat" else compat.completion(plan))
                return JSONResponse(result)
            chunks = compat.chat_stream(plan) if kind == "chat" else compat.completion_stream(plan)
            # Pull the first chunk now so an unreachable backend is an HTTP error, not a broken stream.
            first = await anext(chunks)
        except errors.DomainError as exc:
            return openai_error_response(exc)
        return StreamingResponse(_sse(first, chunks), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(first: dict[str, Any], chunks: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    try:
        yield f"data: {dumps(first)}\n\n".encode()
        async for chunk in chunks:
            yield f"data: {dumps(chunk)}\n\n".encode()
        yield b"data: [DONE]\n\n"
    except errors.DomainError as exc:
        yield f"data: {dumps(error_payload(exc))}\n\n".encode()
    finally:
        await chunks.aclose()
