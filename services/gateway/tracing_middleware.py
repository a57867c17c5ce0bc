"""ASGI middleware: one OpenTelemetry server span, and one Prometheus
observation, per HTTP request.

The span is made current for the whole request, so the gRPC client
interceptors put the backend calls under it and one REST request is one trace
whose root is the HTTP span. A caller's W3C ``traceparent`` header is honoured:
the REST request then joins the caller's trace. The span ends when the
response has been sent (for SSE, when the stream closes), so its duration is
what the HTTP client saw.
"""
from __future__ import annotations

import contextvars
import time
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import Histogram

Scope = dict[str, Any]
Message = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]

TRACER = trace.get_tracer("llmesh.gateway")
# The route that hands every annotated RPC to the generic handler (see server.py).
CATCH_ALL_PREFIX = "/{path:"

HTTP_DURATION = Histogram(
    "llmesh_http_request_duration_seconds", "REST request duration (for SSE: until the stream closes).",
    ["method", "route", "code"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# The route template of the request in flight, filled in by whoever learns it
# (a mutable box: handlers may run in a copied context).
_route_box: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("llmesh_http_route")


def _header_carrier(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def name_request_span(method: str, route_template: str) -> None:
    """Called by a handler once it knows the route: a low-cardinality span name and ``http.route``."""
    span = trace.get_current_span()
    span.update_name(f"{method} {route_template}")
    span.set_attribute("http.route", route_template)
    box = _route_box.get(None)
    if box is not None:
        box["route"] = route_template


def _name_fixed_route(span: trace.Span, scope: Scope, method: str) -> str:
    """Starlette leaves the matched route in the scope; the catch-all REST route names itself instead."""
    path = getattr(scope.get("route"), "path", "")
    if path and not path.startswith(CATCH_ALL_PREFIX):
        span.update_name(f"{method} {path}")
        span.set_attribute("http.route", path)
        return path
    return ""


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
        route = {"route": ""}
        route_token = _route_box.set(route)
        started = time.perf_counter()
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
            fixed = _name_fixed_route(span, scope, method)
            # Requests that never reached a route (refused, unknown path) share one
            # label: raw paths would explode the series.
            HTTP_DURATION.labels(method, fixed or route["route"] or "unrouted", str(status_code or 500)).observe(
                time.perf_counter() - started)
            _route_box.reset(route_token)
            context.detach(token)
            span.end()
