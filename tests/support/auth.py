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
"""
from __future__ import annotations

from pathlib import Path

import grpc

from services.common.clients import make_channel
from services.common.identity import Identity, client_key, service_key, tls_files

#: The credentials directory in-process services use by default (ServerSettings.credentials_dir).
CREDENTIALS = Path("data/credentials")


def service_identity(service: str, credentials: Path = CREDENTIALS, tls: bool = False) -> Identity:
    return Identity(service, service_key(credentials, service), tls_files(credentials, service) if tls else None)


def client_identity(tenant: str, role: str = "developer", credentials: Path = CREDENTIALS,
                    tls: bool = False) -> Identity:
    return Identity(f"client:{tenant}", client_key(credentials, tenant, role),
                    tls_files(credentials, "client") if tls else None)


def service_channel(target: str, service: str, credentials: Path = CREDENTIALS, tls: bool = False,
                    ) -> grpc.aio.Channel:
    """A channel presenting ``service``'s key (e.g. "orchestrator" for the store)."""
    return make_channel(target, service_identity(service, credentials, tls))


def client_channel(target: str, tenant: str, role: str = "developer", credentials: Path = CREDENTIALS,
                   tls: bool = False) -> grpc.aio.Channel:
    """A channel presenting a client key of ``tenant`` with ``role``."""
    return make_channel(target, client_identity(tenant, role, credentials, tls))


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``key``."""
    return (("authorization", f"Bearer {key}"),)
