"""ASGI middleware: one OpenTelemetry server span per HTTP request.

The span is made current for the whole request, so the gRPC client
interceptors put the backend calls under it and one REST request is one trace
whose root is the HTTP span. A caller's W3C ``traceparent`` header is honoured:
the REST request then joins the caller's trace. The span ends when the
response has been sent (for SSE, when the stream closes), so its duration is
what the HTTP client saw.
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

TRACER = trace.get_tracer("llmesh.gateway")
# The route that hands every annotated RPC to the generic handler (see server.py).
CATCH_ALL_PREFIX = "/{path:"


def _header_carrier(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def name_request_span(method: str, route_template: str) -> None:
    """Called by a handler once it knows the route: a low-cardinality span name and ``http.route``."""
    span = trace.get_current_span()
    span.update_name(f"{method} {route_template}")
    span.set_attribute("http.route", route_template)


def _name_fixed_route(span: trace.Span, scope: Scope, method: str) -> None:
    """Starlette leaves the matched route in the scope; the catch-all REST route names itself instead."""
    path = getattr(scope.get("route"), "path", "")
    if path and not path.startswith(CATCH_ALL_PREFIX):
        span.update_name(f"{method} {path}")
        span.set_attribute("http.route", path)


class HttpServerSpanMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        parent = propagate.extract(_header_carrier(scope))
        # Named by method only until a handler names the route: raw paths carry ids.
        span = TRACER.start_span(method, context=parent, kind=SpanKind.SERVER, attributes={
            "http.request.method": method,
            "url.path": scope.get("path", ""),
            "url.scheme": scope.get("scheme", "http"),
        })
        token = context.attach(trace.set_span_in_context(span, parent))
        status_code = 0

        async def send_with_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
                span.set_attribute("http.response.status_code", status_code)
            await send(message)

        try:
            await self.app(scope, receive, send_with_status)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise
        finally:
            # Per the HTTP conventions only 5xx marks a server span as failed; 4xx is the caller's.
            if status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            _name_fixed_route(span, scope, method)
            context.detach(token)
            span.end()
