"""Turning the ``nodes`` setting into addresses: literal or resolved by DNS."""
from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Iterable

Resolver = Callable[[str, int], Awaitable[list[str]]]

DNS_PREFIX = "dns:"


def split_host_port(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_dns(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (a Kubernetes headless Service lists its pods)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    # sockaddr[0] is the host text for AF_INET/AF_INET6 (typeshed also allows the int of other families).
    return sorted({format_address(str(info[4][0]), port) for info in infos})


def has_dns_entries(entries: Iterable[str]) -> bool:
    return any(entry.startswith(DNS_PREFIX) for entry in entries)


async def resolve_entries(entries: Iterable[str], resolver: Resolver = resolve_dns) -> set[str]:
    """Addresses for the configured entries; a failed lookup raises OSError."""
    addresses: set[str] = set()
    for entry in entries:
        if entry.startswith(DNS_PREFIX):
            host, port = split_host_port(entry[len(DNS_PREFIX):])
            addresses.update(await resolver(host, port))
        else:
            addresses.add(entry)
    return addresses
