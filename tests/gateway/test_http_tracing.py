"""Every HTTP request is one server span, parent of the gRPC calls it makes."""
from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Route

from services.gateway.tracing_middleware import HttpServerSpanMiddleware
from tests.gateway.conftest import Mesh
from tests.observability.tracing import capture_spans

CALLER_TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
CALLER_SPAN_ID = 0x00F067AA0BA902B7


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = capture_spans()
    yield exporter
    exporter.shutdown()


def http_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans()
            if s.kind == SpanKind.SERVER and "http.request.method" in (s.attributes or {})]


async def test_rest_call_joins_the_callers_trace_and_parents_the_grpc_call(mesh: Mesh, exporter) -> None:
    traceparent = f"00-{CALLER_TRACE_ID:032x}-{CALLER_SPAN_ID:016x}-01"
    async with mesh.client() as client:
        reply = await client.post("/v1/sessions", json={"tenantId": "acme"}, headers={"traceparent": traceparent})
    assert reply.status_code == 200, reply.text
    (http,) = http_spans(exporter)
    assert http.name == "POST /v1/sessions"
    assert http.attributes["http.route"] == "/v1/sessions"
    assert http.attributes["http.response.status_code"] == 200
    assert http.context.trace_id == CALLER_TRACE_ID
    assert http.parent is not None and http.parent.span_id == CALLER_SPAN_ID
    grpc_calls = [s for s in exporter.get_finished_spans()
                  if s.kind == SpanKind.CLIENT and s.name.endswith("/CreateSession")]
    assert grpc_calls and all(s.parent.span_id == http.context.span_id for s in grpc_calls)
    assert all(s.context.trace_id == CALLER_TRACE_ID for s in grpc_calls)


async def test_refused_request_is_traced_without_marking_the_server_failed(mesh: Mesh, exporter) -> None:
    async with mesh.client(key=None) as client:
        reply = await client.post("/v1/sessions", json={"tenantId": "acme"})
    assert reply.status_code == 401
    (http,) = http_spans(exporter)
    assert http.attributes["http.response.status_code"] == 401
    assert http.status.status_code != StatusCode.ERROR  # a caller's mistake, not a server fault


async def test_fixed_routes_are_named_by_their_path(mesh: Mesh, exporter) -> None:
    async with mesh.client() as client:
        assert (await client.get("/healthz")).status_code == 200
    (http,) = http_spans(exporter)
    assert http.name == "GET /healthz"


async def test_a_handler_that_raises_ends_its_span_as_an_error(exporter) -> None:
    async def broken(_request):
        raise RuntimeError("disk on fire")

    app = Starlette(routes=[Route("/boom", broken)], middleware=[Middleware(HttpServerSpanMiddleware)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/boom")).status_code == 500
    (http,) = http_spans(exporter)
    assert http.status.status_code == StatusCode.ERROR
    assert http.name == "GET /boom"
    assert any(e.name == "exception" for e in http.events)


def _http_count(method: str, route: str, code: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("llmesh_http_request_duration_seconds_count",
                                     {"method": method, "route": route, "code": code}) or 0.0


async def test_requests_are_timed_by_route_template_not_raw_path(mesh: Mesh, exporter) -> None:
    before_create = _http_count("POST", "/v1/sessions", "200")
    before_get = _http_count("GET", "/v1/sessions/{session_id}", "200")
    # Refused before routing: the route is not known yet, and raw paths are never labels.
    before_refused = _http_count("POST", "unrouted", "401")
    async with mesh.client() as client:
        created = await client.post("/v1/sessions", json={"tenantId": "acme"})
        session_id = created.json()["session"]["sessionId"]
        assert (await client.get(f"/v1/sessions/{session_id}")).status_code == 200
    async with mesh.client(key=None) as client:
        assert (await client.post("/v1/sessions", json={"tenantId": "acme"})).status_code == 401
    assert _http_count("POST", "/v1/sessions", "200") == before_create + 1
    assert _http_count("GET", "/v1/sessions/{session_id}", "200") == before_get + 1
    assert _http_count("POST", "unrouted", "401") == before_refused + 1
