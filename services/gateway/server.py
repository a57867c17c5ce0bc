"""Wiring of the REST layer: route table, backends, auth, OpenAI endpoints, uvicorn.

gRPC channels are opened in the serving event loop (Starlette lifespan), and
closed there on shutdown; uvicorn drains in-flight requests for ``grace_s``.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from prometheus_client import start_http_server
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as HttpRoute
from starlette.routing import WebSocketRoute

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter
from services.common.clients import make_channel, service_identity
from services.common.logs import configure_logging
from services.common.refusals import RefusalReporter, grpc_sink
from services.common.settings import load_settings
from services.common.telemetry import configure_tracing
from services.gateway.adapters.grpc_backend import GrpcBackends
from services.gateway.adapters.inference_generator import InferenceGenerator
from services.gateway.adapters.store_responses import StoreResponseLog
from services.gateway.auth_middleware import ApiKeyMiddleware
from services.gateway.config import Settings
from services.gateway.core.openai_compat import OpenAICompat
from services.gateway.core.openai_responses import OpenAIResponses
from services.gateway.core.ports import TextGenerator
from services.gateway.http_api import GenericRestApi
from services.gateway.openai_routes import OpenAIRoutes
from services.gateway.openapi import build_openapi
from services.gateway.routes import Route, load_routes
from services.gateway.tracing_middleware import HttpServerSpanMiddleware
from services.gateway.websocket import SessionSockets

log = logging.getLogger("llmesh.gateway")

_ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE"]
_OPENAI_BODY = {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}}
_OPENAI_OK = {"200": {"description": "OpenAI-compatible response (SSE when stream is true)",
                      "content": {"application/json": {"schema": {"type": "object"}}}},
              "default": {"description": "Error", "content": {"application/json": {"schema": {"type": "object"}}}}}
OPENAI_PATHS = {
    "/v1/chat/completions": {"post": {"operationId": "OpenAI_ChatCompletions", "tags": ["OpenAI"],
                                      "requestBody": _OPENAI_BODY, "responses": _OPENAI_OK}},
    "/v1/completions": {"post": {"operationId": "OpenAI_Completions", "tags": ["OpenAI"],
                                 "requestBody": _OPENAI_BODY, "responses": _OPENAI_OK}},
    "/v1/models": {"get": {"operationId": "OpenAI_ListModels", "tags": ["OpenAI"], "responses": _OPENAI_OK}},
    "/v1/embeddings": {"post": {"operationId": "OpenAI_Embeddings", "tags": ["OpenAI"],
                                "requestBody": _OPENAI_BODY, "responses": _OPENAI_OK}},
    "/v1/responses": {"post": {"operationId": "OpenAI_CreateResponse", "tags": ["OpenAI"],
                               "requestBody": _OPENAI_BODY, "responses": _OPENAI_OK}},
    "/v1/responses/{response_id}": {
        "get": {"operationId": "OpenAI_RetrieveResponse", "tags": ["OpenAI"], "responses": _OPENAI_OK},
        "delete": {"operationId": "OpenAI_DeleteResponse", "tags": ["OpenAI"], "responses": _OPENAI_OK}},
    "/v1/responses/{response_id}/cancel": {"post": {"operationId": "OpenAI_CancelResponse", "tags": ["OpenAI"],
                                                    "responses": _OPENAI_OK}},
    "/v1/responses/{response_id}/input_items": {"get": {"operationId": "OpenAI_ListResponseInputItems",
                                                        "tags": ["OpenAI"], "responses": _OPENAI_OK}},
}


def build_authenticator(settings: Settings) -> ApiKeyAuthenticator | None:
    if not settings.auth_enabled:
        log.warning("authentication is disabled: every request is anonymous")
        return None
    path = settings.credentials_path / settings.api_keys_file
    store = ApiKeyStore.load(path)
    if len(store) == 0:
        log.warning("no API keys in %s: every request will get 401; create one with "
                    "python -m services.common.auth create-key --tenant <t> --keys-file %s", path, path)
    limiter = FailedAttemptLimiter(settings.auth_max_failures, settings.auth_failure_window_s)
    return ApiKeyAuthenticator(store, limiter, cache_ttl_s=settings.auth_cache_ttl_s)


def build_app(settings: Settings, *, authenticator: ApiKeyAuthenticator | None = None,
              generator: TextGenerator | None = None, routes: Sequence[Route] | None = None,
              use_settings_auth: bool = True) -> Starlette:
    """The ASGI app. Tests inject an authenticator and a generator (fake or the balancer)."""
    route_table = list(routes) if routes is not None else load_routes()
    identity = service_identity(settings, "gateway")
    backends = GrpcBackends(settings.backend_targets, timeout_s=settings.backend_timeout_s, identity=identity)
    if authenticator is None and use_settings_auth:
        authenticator = build_authenticator(settings)
    openai = OpenAIRoutes(None, settings.max_body_bytes)
    openapi_doc = build_openapi(route_table, extra_paths=OPENAI_PATHS)
    # Refused REST requests are counted and audited like refused RPCs (docs/auth.md).
    refusals = RefusalReporter("gateway", grpc_sink(lambda: make_channel(settings.audit_target, identity))
                               if settings.audit_target else None)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        source, balancer = generator, None
        if source is None and settings.inference_nodes:
            from services.inference.client.balancer import Balancer

            balancer = Balancer(settings.inference_nodes, identity=identity)
            await balancer.start()
            source = InferenceGenerator(balancer, settings.default_models)
        elif source is None and settings.inference_target:
            source = InferenceGenerator.for_channel(backends.channel("inference"), settings.default_models)
        openai.compat = OpenAICompat(source) if source is not None else None
        if source is not None and openai.compat is not None and settings.store_target:
            store_channel = backends.channel("store")
            openai.responses = OpenAIResponses(source, lambda: StoreResponseLog(store_channel),
                                               require_model=openai.compat.catalog.require)
        refusals.start()
        try:
            yield
        finally:
            if openai.responses is not None:
                await openai.responses.close()
            await refusals.close()
            if balancer is not None:
                await balancer.close()
            await backends.close()

    async def openapi_json(_request: Request) -> JSONResponse:
        return JSONResponse(openapi_doc)

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app = Starlette(
        routes=[
            HttpRoute("/openapi.json", openapi_json, methods=["GET"]),
            HttpRoute("/healthz", healthz, methods=["GET"]),
            HttpRoute("/v1/chat/completions", openai.chat_completions, methods=["POST"]),
            HttpRoute("/v1/completions", openai.completions, methods=["POST"]),
            HttpRoute("/v1/models", openai.models, methods=["GET"]),
            HttpRoute("/v1/embeddings", openai.embeddings, methods=["POST"]),
            HttpRoute("/v1/responses", openai.create_response, methods=["POST"]),
            HttpRoute("/v1/responses/{response_id}", openai.retrieve_response, methods=["GET"]),
            HttpRoute("/v1/responses/{response_id}", openai.delete_response, methods=["DELETE"]),
            HttpRoute("/v1/responses/{response_id}/cancel", openai.cancel_response, methods=["POST"]),
            HttpRoute("/v1/responses/{response_id}/input_items", openai.response_input_items, methods=["GET"]),
            WebSocketRoute("/v1/sessions/{session_id}/ws", SessionSockets(backends, settings.ws_send_queue).endpoint),
            HttpRoute("/{path:path}", GenericRestApi(route_table, backends, settings.max_body_bytes).handle,
                      methods=_ANY_METHOD),
        ],
        # Tracing outermost: refused requests (401/429) are traced too.
        middleware=[Middleware(HttpServerSpanMiddleware),
                    Middleware(ApiKeyMiddleware, authenticator=authenticator, refusals=refusals,
                               ws_auth_timeout_s=settings.ws_auth_timeout_s)],
        lifespan=lifespan,
    )
    app.state.backends = backends
    app.state.openai = openai
    return app


def websocket_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's WebSocket settings: protocol pings find dead peers; messages are as large as a REST body."""
    return {"ws_ping_interval": settings.ws_ping_interval_s or None,
            "ws_ping_timeout": settings.ws_ping_timeout_s or None,
            "ws_max_size": settings.max_body_bytes}


def uvicorn_config(app: Any, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          lifespan="on", timeout_graceful_shutdown=int(settings.grace_s) or 1,
                          **websocket_options(settings))


@contextlib.asynccontextmanager
async def running_gateway(app: Any, host: str = "127.0.0.1", port: int = 0, **options: Any) -> AsyncIterator[str]:
    """For tests and benchmarks: serve ``app`` in this event loop; yields the base URL.

    ``options`` go to uvicorn.Config (e.g. ``websocket_options(settings)``).
    """
    # IPPROTO_TCP named explicitly: asyncio turns Nagle off (TCP_NODELAY) only for sockets that say so.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                          timeout_graceful_shutdown=1, **options))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        # Start-up only: wait briefly for the listener (uvicorn offers no event for it).
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        if not server.started:
            raise RuntimeError("gateway did not start")
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


def main(argv: Sequence[str] | None = None) -> None:
    settings = load_settings(Settings, "gateway", sys.argv[1:] if argv is None else argv)
    configure_logging("gateway", settings.log_level)
    provider = configure_tracing("gateway", settings)
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    if settings.metrics_port >= 0:
        start_http_server(settings.metrics_port, addr=settings.host)
    try:
        uvicorn.Server(uvicorn_config(build_app(settings), settings)).run()
    finally:
        if provider is not None:
            provider.shutdown()
