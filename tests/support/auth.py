"""Credentials for tests: every service in the suite authenticates, as in production.

In-process services read keys from the default credentials directory
(``data/credentials`` under the working directory, the repository root when
pytest runs); a test calls them as a mesh service the authorisation table
allows for the RPCs it drives, or as a client key of one tenant::

    async with service_channel(svc.address, "orchestrator") as channel:   # e.g. the store's RPCs
        ...
    async with client_channel(svc.address, "acme") as channel:            # tenant comes from the key
        ...

Meshes started in other processes (``make run``-style) keep their
credentials under their data directory: pass ``credentials=<data>/credentials``.

With ``LLMESH_TEST_TLS=1`` (``make test-tls``) the whole suite runs with mutual
TLS: every in-process service serves TLS (tests/conftest.py), and these
helpers open TLS channels with the mesh CA and a certificate of the caller.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from services.common.clients import make_channel
from services.common.identity import Identity, client_key, service_key, tls_files

#: The credentials directory in-process services use by default (ServerSettings.credentials_dir).
CREDENTIALS = Path("data/credentials")
#: Whether this run of the suite uses TLS everywhere.
TLS = os.environ.get("LLMESH_TEST_TLS", "") not in ("", "0")
_own_transport = 0


def forced_tls() -> bool:
    """Whether settings built now get ``tls_enabled`` forced on (a TLS run, outside ``own_transport``)."""
    return TLS and _own_transport == 0


@contextlib.contextmanager
def own_transport() -> Iterator[None]:
    """Settings built inside keep the ``tls_enabled`` they are given, in a TLS run too.

    For tests of one transport against the other (a plaintext probe of a TLS
    port, say); everywhere else a TLS run turns TLS on (tests/conftest.py).
    """
    global _own_transport
    _own_transport += 1
    try:
        yield
    finally:
        _own_transport -= 1


def service_identity(service: str, credentials: Path = CREDENTIALS, tls: bool = TLS) -> Identity:
    return Identity(service, service_key(credentials, service), tls_files(credentials, service) if tls else None)


def client_identity(tenant: str, role: str = "developer", credentials: Path = CREDENTIALS,
                    tls: bool = TLS) -> Identity:
    return Identity(f"client:{tenant}", client_key(credentials, tenant, role),
                    tls_files(credentials, "client") if tls else None)


def service_channel(target: str, service: str, credentials: Path = CREDENTIALS, tls: bool = TLS,
                    ) -> grpc.aio.Channel:
    """A channel presenting ``service``'s key (e.g. "orchestrator" for the store)."""
    return make_channel(target, service_identity(service, credentials, tls))


def client_channel(target: str, tenant: str, role: str = "developer", credentials: Path = CREDENTIALS,
                   tls: bool = TLS) -> grpc.aio.Channel:
    """A channel presenting a client key of ``tenant`` with ``role``."""
    return make_channel(target, client_identity(tenant, role, credentials, tls))


def open_channel(target: str, credentials: Path = CREDENTIALS, tls: bool = TLS) -> grpc.aio.Channel:
    """A channel with no key, for health checks, reflection and refusal tests (TLS in a TLS run)."""
    return make_channel(target, Identity("anonymous", None, tls_files(credentials, "client") if tls else None))


def open_sync_channel(target: str, credentials: Path = CREDENTIALS, tls: bool = TLS) -> grpc.Channel:
    """The blocking flavour of ``open_channel``."""
    if not tls:
        return grpc.insecure_channel(target)
    files = tls_files(credentials, "client")
    ca, cert, key = files.read()
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``key``."""
    return (("authorization", f"Bearer {key}"),)
