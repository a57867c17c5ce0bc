"""HTTP handlers of the OpenAI-compatible endpoints (thin: JSON in, core, JSON/SSE out)."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common import errors
from services.gateway.core.json_body import loads_body
from services.gateway.core.openai_compat import CompletionPlan, OpenAICompat, dumps, plan_chat, plan_completion
from services.gateway.core.openai_embeddings import OpenAIEmbeddings, plan_embedding
from services.gateway.core.openai_responses import OpenAIResponses, plan_response
from services.gateway.core.ports import EmbeddingSource
from services.gateway.http_api import forwarded_metadata, read_body
from services.gateway.http_errors import error_payload, openai_error_response

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class OpenAIRoutes:
    def __init__(self, compat: OpenAICompat | None, max_body_bytes: int) -> None:
        self.compat = compat
        self.max_body_bytes = max_body_bytes
        # /v1/responses: set at start-up when both an inference backend and the store are configured.
        self.responses: OpenAIResponses | None = None

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

    def _responses(self) -> OpenAIResponses:
        if self.responses is None:
            raise errors.Unavailable("/v1/responses needs the store (setting store_target) and an inference backend",
                                     reason="BACKEND_NOT_CONFIGURED", metadata={"backend": "store"})
        return self.responses

    async def create_response(self, request: Request) -> Response:
        try:
            # The body is checked first: a bad field is a 400 whatever the backends.
            plan = plan_response(await self._body(request))
            responses = self._responses()
            principal = getattr(request.state, "principal", None)
            events = responses.create(plan, tenant_id=principal.tenant_id if principal else "",
                                      metadata=tuple(forwarded_metadata(request)))
            # The first event (response.created) is pulled now: a bad chain or an unreachable store is an HTTP error.
            first = await anext(events)
            if plan.stream:
                return StreamingResponse(_response_sse(first, events), media_type="text/event-stream",
                                         headers=_SSE_HEADERS)
            if plan.background:
                await events.aclose()
                return JSONResponse(first["response"])
            last = first
            async for event in events:
                last = event
        except errors.DomainError as exc:
            return openai_error_response(exc)
        return JSONResponse(last["response"])

    async def retrieve_response(self, request: Request) -> Response:
        try:
            responses = self._responses()
            response_id = request.path_params["response_id"]
            query = _query(request, ("stream", "starting_after", "include"))
            stream = _query_bool(query, "stream")
            after = _query_int(query, "starting_after", 0, 2**31)
            errors.require(after is None or stream, "starting_after", "is only allowed with stream=true")
            if not stream:
                return JSONResponse(await responses.retrieve(response_id))
            events = responses.replay(response_id, after)
            first = await anext(events, None)
        except errors.DomainError as exc:
            return openai_error_response(exc)
        return StreamingResponse(_response_sse(first, events), media_type="text/event-stream", headers=_SSE_HEADERS)

    async def cancel_response(self, request: Request) -> Response:
        try:
            raw = await read_body(request, self.max_body_bytes)
            errors.require(not raw.strip(), "body", "cancel takes no body")
            return JSONResponse(await self._responses().cancel(request.path_params["response_id"]))
        except errors.DomainError as exc:
            return openai_error_response(exc)

    async def delete_response(self, request: Request) -> Response:
        try:
            return JSONResponse(await self._responses().delete(request.path_params["response_id"]))
        except errors.DomainError as exc:
            return openai_error_response(exc)

    async def response_input_items(self, request: Request) -> Response:
        try:
            query = _query(request, ("limit", "order", "after", "include"))
            limit = _query_int(query, "limit", 1, 100)
            result = await self._responses().input_items(
                request.path_params["response_id"], limit=20 if limit is None else limit,
                order=query.get("order", "desc"), after=query.get("after"))
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


def _query(request: Request, known: tuple[str, ...]) -> dict[str, str]:
    """The query parameters, refusing unknown ones and any ``include`` (nothing extra can be included yet)."""
    query = dict(request.query_params)
    for name in query:
        errors.require(name in known, name, "unknown query parameter")
    errors.require(not query.get("include"), "include", "nothing extra can be included yet")
    return query


def _query_bool(query: dict[str, str], name: str) -> bool:
    value = query.get(name, "false").lower()
    errors.require(value in ("true", "false"), name, "must be true or false")
    return value == "true"


def _query_int(query: dict[str, str], name: str, low: int, high: int) -> int | None:
    value = query.get(name)
    if value is None:
        return None
    errors.require(value.isdigit() and low <= int(value) <= high, name, f"must be an integer between {low} and {high}")
    return int(value)


async def _response_sse(first: dict[str, Any] | None,
                        events: AsyncGenerator[dict[str, Any], None]) -> AsyncIterator[bytes]:
    """Responses stream events as SSE, each named by its type (``event:``), as the API frames them."""
    try:
        if first is not None:
            yield f"event: {first['type']}\ndata: {dumps(first)}\n\n".encode()
            async for event in events:
                yield f"event: {event['type']}\ndata: {dumps(event)}\n\n".encode()
    except errors.DomainError as exc:
        error = json.loads(bytes(openai_error_response(exc).body))["error"]
        yield f"event: error\ndata: {dumps({'type': 'error', **error})}\n\n".encode()
    finally:
        await events.aclose()
