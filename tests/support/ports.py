"""Loopback ports for servers that must know their port before they start.

A server in this process binds port 0 and reads its port back
(``running_service`` does). A child process, a PostgreSQL cluster, a
service restarted on the same port or ``make run`` needs its port first, and
a port that was merely probed free and released can be lost before the
child binds it:

- any outgoing connection on the machine may get an ephemeral-range port as
  its local port, and once that connection sits in TIME_WAIT the port stays
  blocked for a minute to a server binding it;
- another test may pick the same port.

So the ports handed out here come from below the ephemeral range, where the
kernel puts no outgoing connection, and each is *reserved*: bound without
SO_REUSEADDR (so any socket on it, TIME_WAIT included, makes us pick
another), then made to accept one connection that it closes first. That
leaves the port in TIME_WAIT for about 60 s under a socket marked
SO_REUSEADDR: another reservation here sees it as taken, while a server
that sets SO_REUSEADDR (gRPC, uvicorn, prometheus_client and PostgreSQL
all do) binds it at once.
"""
from __future__ import annotations

import random
import socket
from collections.abc import Iterable
from pathlib import Path

LOOPBACK = "127.0.0.1"
_FALLBACK_EPHEMERAL_LOW = 32768
_LOWEST_PORT = 20000


def _reserve(port: int, host: str) -> None:
    """Reserve ``port``; raises OSError if any socket uses it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((host, port))
        # Set after bind, so the check above was strict while the accepted
        # socket, and so its TIME_WAIT, lets a reusing server in.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.listen(1)
        with socket.create_connection((host, port), timeout=5):
            accepted, _ = listener.accept()
            accepted.close()  # the server side closes first, so the TIME_WAIT is on this port


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return _FALLBACK_EPHEMERAL_LOW


def free_port_base(offsets: Iterable[int], host: str = LOOPBACK, attempts: int = 200) -> int:
    """A base port with ``base + offset`` reserved for every offset (``make run``'s port layout)."""
    offsets = sorted(set(offsets))
    high = _ephemeral_low() - max(offsets)
    if high <= _LOWEST_PORT:
        raise OSError(f"no room below the ephemeral range for offsets up to {max(offsets)}")
    for _ in range(attempts):
        base = random.randrange(_LOWEST_PORT, high)
        try:
            for offset in offsets:
                _reserve(base + offset, host)
        except OSError:
            continue  # the ports reserved so far lapse on their own
        return base
    raise OSError(f"no free ports for offsets {offsets} on {host} after {attempts} attempts")


def free_port(host: str = LOOPBACK) -> int:
    """One reserved port on ``host`` (see the module docstring)."""
    return free_port_base([0], host)


def free_launcher_port_base(nodes: int = 1, http_offset: int | None = None) -> int:
    """A ``--port-base`` for ``services.launcher`` with every port of its plan reserved, metrics ports included.

    ``http_offset``: the gateway's port as an offset from the base (None: no gateway).
    """
    from services.launcher import plan_children

    plan = plan_children(Path("unused"), 0, nodes, http_offset)
    return free_port_base({port for child in plan for port in (child.port, child.metrics_port)})
