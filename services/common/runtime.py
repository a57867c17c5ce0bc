"""The one way to build and run a llmesh gRPC service.

Lifecycle: listen with health NOT_SERVING for the service (the empty name,
liveness, is SERVING at once) -> ``app.start()`` (load the model, open the
database) -> SERVING. On SIGTERM/SIGINT: health drains to NOT_SERVING ->
``server.stop(grace)`` -> ``app.close()`` -> flush traces.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor
from prometheus_client import start_http_server

from services.common.interceptors import AuthInterceptor, ErrorInterceptor
from services.common.logs import configure_logging
from services.common.refusals import RefusalReporter, Sink
from services.common.settings import ServerSettings, load_settings
from services.common.telemetry import configure_tracing

log = logging.getLogger("llmesh.runtime")

S = TypeVar("S", bound=ServerSettings)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class ServiceApp(Protocol):
    """What a service hands the runtime."""

    @property
    def service_names(self) -> Sequence[str]:
        """Full proto names of the services it serves, e.g. "llmesh.store.v1.StoreService"."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add servicers to the server (no I/O)."""

    async def start(self) -> None:
        """Acquire resources; the service turns SERVING when this returns."""

    async def close(self) -> None:
        """Release resources after the server stopped."""


@dataclass
class RunningService:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    app: ServiceApp
    settings: ServerSettings
    port: int
    metrics_port: int | None
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    on_close: list[Callable[[], Awaitable[None] | None]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def stop(self, grace: float | None = None) -> None:
        if self.stopped.is_set():
            return
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.grace_s if grace is None else grace)
        try:
            await self.app.close()
        finally:
            for close in self.on_close:
                result = close()
                if result is not None:
                    await result
            self.stopped.set()


def server_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        # Clients ping every 30 s (clients.channel_options), idle watches included; the server's
        # default floor (5 min) would answer those pings with GOAWAY too_many_pings.
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 20_000),
        # Calls waiting for the Python server to pick them up; past the default
        # (1000) gRPC cancels them, so a burst of reconnecting watchers (after
        # a restart) would lose a share of its streams.
        ("grpc.server.max_pending_requests", 20_000),
        ("grpc.server.max_pending_requests_hard_limit", 40_000),
    ]


async def start_service(app: ServiceApp, settings: ServerSettings) -> RunningService:
    """Start serving ``app``; returns once it is ready (health SERVING)."""
    interceptors: list[grpc.aio.ServerInterceptor] = [aio_server_interceptor()]
    on_close: list[Callable[[], Awaitable[None] | None]] = []
    if settings.auth_enabled:
        from services.common.auth import ApiKeyAuthenticator, ApiKeyStore

        name = short_name(app.service_names[0]) if app.service_names else "unnamed"
        store = ApiKeyStore.load(settings.credentials_path / settings.api_keys_file)
        authenticator = ApiKeyAuthenticator(store, cache_ttl_s=settings.auth_cache_ttl_s)
        refusals = RefusalReporter(name, refusal_sink(app, settings, name))
        interceptors.append(AuthInterceptor(authenticator, refusals=refusals))
        on_close += [authenticator.close, refusals.close]
    interceptors.append(ErrorInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=server_options())
    app.register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*app.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in app.service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    address = f"{settings.host}:{settings.port}"
    if settings.tls_enabled:
        port = server.add_secure_port(address, server_credentials(settings, short_name(app.service_names[0])))
    else:
        port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind {settings.host}:{settings.port}")
    metrics_port = None
    if settings.metrics_port >= 0:
        metrics_server, _thread = start_http_server(settings.metrics_port, addr=settings.host)
        metrics_port = metrics_server.server_port
    await server.start()
    running = RunningService(server, health_servicer, app, settings, port, metrics_port, on_close=on_close)
    if settings.auth_enabled:
        refusals.start()
    try:
        await app.start()
    except BaseException:
        await server.stop(0)
        raise
    for name in app.service_names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return running


def short_name(full_name: str) -> str:
    """``llmesh.store.v1.StoreService`` -> ``store``: the name of a service's identity."""
    parts = full_name.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "llmesh" else full_name


def server_credentials(settings: ServerSettings, service: str) -> grpc.ServerCredentials:
    from services.common.identity import tls_files

    ca, cert, key = tls_files(settings.credentials_path, service).read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                       require_client_auth=settings.tls_require_client_cert)


def refusal_sink(app: ServiceApp, settings: ServerSettings, service: str) -> Sink | None:
    """Where refused calls go for the audit trail: the app itself if it keeps
    the trail (policy), else the policy service at ``audit_target``."""
    own = getattr(app, "record_access_denials", None)
    if own is not None:
        return own  # the policy app's bound method
    if not settings.audit_target:
        return None
    from services.common.clients import make_channel, service_identity
    from services.common.refusals import grpc_sink

    return grpc_sink(lambda: make_channel(settings.audit_target, service_identity(settings, service)))


@contextlib.asynccontextmanager
async def running_service(app: ServiceApp, settings: ServerSettings) -> AsyncIterator[RunningService]:
    """For tests: a started service on its own port, stopped on exit."""
    running = await start_service(app, settings)
    try:
        yield running
    finally:
        await running.stop(grace=0.5)


async def serve(app: ServiceApp, settings: ServerSettings, service: str) -> None:
    """Run until SIGTERM/SIGINT, then stop in order."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = await start_service(app, settings)
    # One line a launcher can parse; the rest of the logs are JSON.
    log.info(
        "serving",
        extra={"event": "serving", "port": running.port, "metrics_port": running.metrics_port,
               "services": list(app.service_names)},
    )
    await stop.wait()
    log.info("draining", extra={"event": "draining", "grace_s": settings.grace_s})
    await running.stop()
    log.info("stopped", extra={"event": "stopped"})


def main(service: str, settings_cls: type[S], build_app: Callable[[S], ServiceApp],
         argv: Sequence[str] | None = None) -> None:
    """Entry point for ``python -m services.<service>``."""
    settings = load_settings(settings_cls, service, sys.argv[1:] if argv is None else argv)
    configure_logging(service, settings.log_level)
    provider = configure_tracing(service, settings)
    try:
        asyncio.run(serve(build_app(settings), settings, service))
    finally:
        if provider is not None:
            provider.shutdown()
