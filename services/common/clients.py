"""Outbound gRPC channels with identity, tracing, keepalive and sane limits.

Every channel a service opens presents the service's own key (and its
certificate when TLS is on). When the call is made on behalf of a client
(the current RPC's principal is a client), the client's principal rides
along in ``x-llmesh-principal``, which the receiving service trusts only
because the caller authenticated as a mesh service.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.common.auth import principal_var
from services.common.authz import PRINCIPAL_HEADER, encode_principal
from services.common.identity import Identity, TlsFiles, client_key, service_key, tls_files
from services.common.runtime import MAX_MESSAGE_BYTES
from services.common.settings import ServerSettings


def channel_options() -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def service_identity(settings: ServerSettings, service: str) -> Identity:
    """How ``service`` presents itself to the others, per its settings."""
    key = service_key(settings.credentials_path, service) if settings.auth_enabled else None
    tls = tls_files(settings.credentials_path, service) if settings.tls_enabled else None
    return Identity(service, key, tls)


def client_identity(settings: ServerSettings, tenant: str, role: str = "developer") -> Identity:
    """A client of ``tenant`` for local tools and tests, with a key kept under credentials_dir."""
    key = client_key(settings.credentials_path, tenant, role) if settings.auth_enabled else None
    tls = tls_files(settings.credentials_path, "client") if settings.tls_enabled else None
    return Identity(f"client:{tenant}", key, tls)


class _Credentials:
    """Adds ``authorization`` and, for calls made for a client, ``x-llmesh-principal``."""

    def __init__(self, key: str | None) -> None:
        self._authorization = f"Bearer {key}" if key else None

    def details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        extra: list[tuple[str, str]] = []
        if self._authorization:
            extra.append(("authorization", self._authorization))
        principal = principal_var.get()
        if principal is not None and not principal.is_service:
            extra.append((PRINCIPAL_HEADER, encode_principal(principal)))
        if not extra:
            return details
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for name, value in extra:
            if name not in metadata:
                metadata.add(name, value)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_Credentials, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self.details(client_call_details), request)


class _UnaryStream(_Credentials, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(self.details(client_call_details), request)


class _StreamUnary(_Credentials, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(self.details(client_call_details), request_iterator)


class _StreamStream(_Credentials, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(self.details(client_call_details), request_iterator)


def credential_interceptors(identity: Identity | None) -> list[grpc.aio.ClientInterceptor]:
    key = identity.key if identity is not None else None
    return [_UnaryUnary(key), _UnaryStream(key), _StreamUnary(key), _StreamStream(key)]


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = tls.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def make_channel(target: str, identity: Identity | None, *, traced: bool = True,
                 options: Sequence[tuple[str, Any]] | None = None, server_name: str = "") -> grpc.aio.Channel:
    """A channel to ``target`` (host:port) that presents ``identity`` on every call.

    ``identity`` None sends no credentials: only for health checks and
    reflection, or a mesh run with authentication off. ``server_name``: with
    TLS, the name the server's certificate must carry when the target is an
    address no certificate lists (inference pods found by DNS, say).
    """
    interceptors: list[Any] = credential_interceptors(identity)
    if traced:
        interceptors.extend(aio_client_interceptors())
    opts = list(options) if options is not None else channel_options()
    if identity is not None and identity.tls is not None:
        if server_name:
            opts.append(("grpc.ssl_target_name_override", server_name))
        return grpc.aio.secure_channel(target, channel_credentials(identity.tls), options=opts,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors)
