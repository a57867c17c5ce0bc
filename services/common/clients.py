"""Outbound gRPC channels with identity, tracing, keepalive and sane limits.

Every channel a service opens presents the service's own key (and its
certificate when TLS is on). When the call is made on behalf of a client
(the current RPC's principal is a client), the client's principal rides
along in ``x-llmesh-principal``, which the receiving service trusts only
because the caller authenticated as a mesh service.

A target may name several replicas of one service, as a comma-separated list
of IP addresses (``127.0.0.1:50052,127.0.0.1:50072``, what ``make run
REPLICAS=2`` hands every service) or as gRPC's own ``ipv4:``/``ipv6:`` form:
the channel then spreads calls over them round robin, each call on any
replica, and skips a replica it cannot reach (``resolve_target``).
"""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from services.common.auth import principal_var
from services.common.authz import PRINCIPAL_HEADER, encode_principal
from services.common.errors import InvalidArgument
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


ROUND_ROBIN_CONFIG = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_ADDRESS_SCHEMES = ("ipv4:", "ipv6:")


@dataclass(frozen=True)
class ResolvedTarget:
    """What gRPC dials for a target, and how."""

    #: The target as gRPC takes it (``ipv4:h:p,h:p`` for several replicas).
    uri: str
    #: ``host:port`` of each replica; one entry for a single address.
    addresses: tuple[str, ...]
    #: Channel options it needs: the round-robin service config for several replicas.
    options: tuple[tuple[str, str], ...] = ()
    #: With TLS, the name each replica's certificate must carry: the host the replicas share.
    tls_name: str = ""

    @property
    def replicated(self) -> bool:
        return len(self.addresses) > 1


def _split_host_port(address: str, target: str) -> tuple[str, str]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InvalidArgument(f"target {target!r}: {address!r} is not host:port", field="target")
    return host.removeprefix("[").removesuffix("]"), port


def resolve_target(target: str) -> ResolvedTarget:
    """``target`` as gRPC dials it: unchanged for one address (or a ``dns:``/``unix:`` target),
    ``ipv4:``/``ipv6:`` with round robin for several replicas.

    Several replicas must be IP literals of one family (gRPC resolves a list of
    addresses itself, not a list of names); a name is refused, naming the target.
    """
    text = target.strip()
    scheme = next((s for s in _ADDRESS_SCHEMES if text.startswith(s)), "")
    if not scheme and "," not in text:
        return ResolvedTarget(text, (text,))
    listed = text[len(scheme):]
    addresses = tuple(a.strip() for a in listed.split(",") if a.strip())
    if not addresses:
        raise InvalidArgument(f"target {target!r} names no address", field="target")
    if len(addresses) == 1 and scheme:
        return ResolvedTarget(text, addresses)
    hosts: list[str] = []
    normal: list[str] = []
    families: set[int] = set()
    for address in addresses:
        host, port = _split_host_port(address, target)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise InvalidArgument(f"target {target!r}: several replicas are listed by IP address, and {host!r} "
                                  "is not one", field="target") from None
        families.add(ip.version)
        hosts.append(str(ip))
        normal.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(families) > 1:
        raise InvalidArgument(f"target {target!r} mixes IPv4 and IPv6 addresses", field="target")
    family = f"ipv{families.pop()}:"
    if scheme and scheme != family:
        raise InvalidArgument(f"target {target!r}: the addresses are not {scheme.rstrip(':')}", field="target")
    return ResolvedTarget(family + ",".join(normal), tuple(normal), (("grpc.service_config", ROUND_ROBIN_CONFIG),),
                          tls_name=hosts[0] if len(set(hosts)) == 1 else "")


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
    """A channel to ``target`` that presents ``identity`` on every call.

    ``target``: host:port, or several replicas' addresses (see
    ``resolve_target``), which the channel calls round robin. ``identity``
    None sends no credentials: only for health checks and reflection, or a
    mesh run with authentication off. ``server_name``: with TLS, the name the
    server's certificate must carry when the target is an address no
    certificate lists (inference pods found by DNS, say); for several
    replicas it defaults to the IP address they share, since gRPC would
    otherwise check the certificates for the whole list.
    """
    resolved = resolve_target(target)
    interceptors: list[Any] = credential_interceptors(identity)
    if traced:
        interceptors.extend(aio_client_interceptors())
    opts = list(options) if options is not None else channel_options()
    given = {name for name, _ in opts}
    opts.extend(option for option in resolved.options if option[0] not in given)
    if identity is not None and identity.tls is not None:
        name = server_name or resolved.tls_name
        if resolved.replicated and not name:
            raise InvalidArgument(f"target {target!r}: with TLS, replicas on different hosts need a server_name "
                                  "that every certificate carries", field="target")
        if name:
            opts.append(("grpc.ssl_target_name_override", name))
        return grpc.aio.secure_channel(resolved.uri, channel_credentials(identity.tls), options=opts,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(resolved.uri, options=opts, interceptors=interceptors)
