"""The generic REST handler: HTTP request -> annotated RPC -> JSON, SSE or NDJSON.

Thin on purpose: match the route, decode (convert.py), call the backend,
encode. Streams are prefetched by one message so a failure before the first
event is a plain HTTP error with the right status, not a broken stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from services.common import authz, errors
from services.common.auth import Principal
from services.gateway import convert
from services.gateway.adapters.grpc_backend import GrpcBackends
from services.gateway.core import streaming
from services.gateway.http_errors import error_payload, error_response
from services.gateway.routes import Route, match_route, path_exists
from services.gateway.tracing_middleware import name_request_span

SSE_HEARTBEAT_S = 15.0
_CONTENT_LENGTH = re.compile(r"[0-9]{1,18}")


def forwarded_metadata(request: Request) -> list[tuple[str, str]]:
    """Metadata for the backend call beyond what the channel adds.

    None: the caller's key never travels on. The gateway calls with its own
    service key and the client rides along as the principal its middleware
    set (``x-llmesh-principal``), which backends trust only from a service.
    """
    return []


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused (400 naming ``body``) once it passes ``max_bytes``, before it is all read."""
    def too_large() -> errors.InvalidArgument:
        return errors.InvalidArgument(f"body: larger than {max_bytes} bytes", field="body", reason="BODY_TOO_LARGE")

    declared = request.headers.get("content-length", "").strip()
    if declared and (not _CONTENT_LENGTH.fullmatch(declared) or int(declared) > max_bytes):
        raise too_large()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise too_large()
        chunks.append(chunk)
    return b"".join(chunks)


class GenericRestApi:
    def __init__(self, routes: Sequence[Route], backends: GrpcBackends, max_body_bytes: int) -> None:
        self.routes = list(routes)
        self.backends = backends
        self.max_body_bytes = max_body_bytes

    async def handle(self, request: Request) -> Response:
        path = request.scope.get("raw_path", b"").decode("latin-1").split("?", 1)[0] or request.url.path
        found = match_route(self.routes, request.method, path)
        if found is None:
            allowed = path_exists(self.routes, path)
            if allowed:
                return error_response_with(405, "METHOD_NOT_ALLOWED",
                                           f"{request.method} is not allowed here; use {', '.join(allowed)}",
                                           {"Allow": ", ".join(allowed)})
            return error_response(errors.NotFound(f"no route for {request.method} {path}", reason="ROUTE_NOT_FOUND"))
        route, path_vars = found
        name_request_span(request.method, route.template.template)
        try:
            message = await self._decode(request, route, path_vars)
            metadata = forwarded_metadata(request)
            if route.server_streaming:
                return await self._stream(request, route, message, metadata)
            reply = await self.backends.unary(route, message, metadata)
            return JSONResponse(convert.message_to_json(reply))
        except errors.DomainError as exc:
            return error_response(exc)

    async def _decode(self, request: Request, route: Route, path_vars: dict[str, str]) -> Any:
        body = await read_body(request, self.max_body_bytes) if route.body else b""
        message = convert.build_request(route.input_type, route.request_class(), body_rule=route.body, body=body,
                                        path_vars=path_vars, query=request.query_params.multi_items())
        principal: Principal | None = getattr(request.state, "principal", None)
        if principal is not None:
            authz.bind_request(message, principal)
        try:
            last_event_id = streaming.parse_last_event_id(request.headers.get("last-event-id"))
        except ValueError as exc:
            raise errors.InvalidArgument(str(exc), field="Last-Event-ID") from None
        convert.apply_resume_point(message, last_event_id)
        return message

    async def _stream(self, request: Request, route: Route, message: Any,
                      metadata: list[tuple[str, str]]) -> Response:
        media_type = streaming.choose_stream_format(request.headers.get("accept"))
        replies = self.backends.stream(route, message, metadata)
        try:
            first = await anext(replies)
        except StopAsyncIteration:
            first = None
        except BaseException:
            await replies.aclose()
            raise
        frames = _frames(first, replies, media_type)
        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(frames, media_type=media_type, headers=headers)


def error_response_with(status: int, reason: str, message: str, headers: dict[str, str]) -> JSONResponse:
    body = {"error": {"code": status, "status": reason, "message": message, "details": []}}
    return JSONResponse(body, status_code=status, headers=headers)


def _frame(payload: dict, media_type: str) -> bytes:
    if media_type == streaming.NDJSON_MEDIA_TYPE:
        return streaming.ndjson_line(payload)
    return streaming.sse_frame(payload, event_id=streaming.find_seq(payload))


async def _frames(first: Any, replies: AsyncGenerator[Any, None], media_type: str) -> AsyncIterator[bytes]:
    """Encoded stream; ends with an error frame if the backend fails midway."""
    pending: asyncio.Future | None = None
    try:
        if first is None:
            return
        yield _frame(convert.message_to_json(first), media_type)
        while True:
            pending = pending or asyncio.ensure_future(anext(replies))
            done, _ = await asyncio.wait({pending}, timeout=SSE_HEARTBEAT_S)
            if not done:
                # Keeps proxies from closing a quiet stream (e.g. a run waiting for approval).
                if media_type == streaming.SSE_MEDIA_TYPE:
                    yield streaming.sse_comment("keep-alive")
                continue
            try:
                reply = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield _frame(convert.message_to_json(reply), media_type)
    except errors.DomainError as exc:
        payload = error_payload(exc)
        if media_type == streaming.NDJSON_MEDIA_TYPE:
            yield streaming.ndjson_line(payload)
        else:
            yield streaming.sse_frame(payload, event="error")
    finally:
        if pending is not None and not pending.done():
            # The backend stream is mid-step: stop it there, or it cannot be closed ("already running").
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                await pending
        await replies.aclose()
