"""A target naming several replicas: make_channel calls them round robin, in plaintext and with mutual TLS."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.clients import ROUND_ROBIN_CONFIG, make_channel, resolve_target
from services.common.errors import InvalidArgument
from services.common.identity import Identity, init_tls, tls_files


def test_one_address_is_dialled_as_given() -> None:
    for target in ("127.0.0.1:50052", "orchestrator:50052", "dns:inference-nodes:50051", "ipv4:127.0.0.1:1"):
        resolved = resolve_target(target)
        assert (resolved.uri, resolved.options, resolved.replicated) == (target, (), False)


@pytest.mark.parametrize(("target", "uri", "tls_name"), [
    ("127.0.0.1:50052,127.0.0.1:50072", "ipv4:127.0.0.1:50052,127.0.0.1:50072", "127.0.0.1"),
    (" 127.0.0.1:1 , 127.0.0.2:2,", "ipv4:127.0.0.1:1,127.0.0.2:2", ""),
    ("ipv4:127.0.0.1:1,127.0.0.1:2", "ipv4:127.0.0.1:1,127.0.0.1:2", "127.0.0.1"),
    ("[::1]:1,[::1]:2", "ipv6:[::1]:1,[::1]:2", "::1"),
])
def test_several_replicas_become_one_round_robin_target(target: str, uri: str, tls_name: str) -> None:
    resolved = resolve_target(target)
    assert resolved.uri == uri
    assert resolved.replicated
    assert resolved.options == (("grpc.service_config", ROUND_ROBIN_CONFIG),)
    assert resolved.tls_name == tls_name


@pytest.mark.parametrize(("target", "says"), [
    ("localhost:1,localhost:2", "'localhost' is not one"),
    ("127.0.0.1:1,[::1]:2", "mixes IPv4 and IPv6"),
    ("127.0.0.1,127.0.0.1:2", "'127.0.0.1' is not host:port"),
    ("ipv6:127.0.0.1:1,127.0.0.1:2", "not ipv6"),
    (",", "names no address"),
])
def test_a_list_grpc_cannot_dial_is_refused_naming_the_target(target: str, says: str) -> None:
    with pytest.raises(InvalidArgument, match=says) as caught:
        resolve_target(target)
    assert caught.value.field == "target"
    assert repr(target) in str(caught.value)


@dataclass
class Replicas:
    addresses: list[str]
    calls: list[int]


class CountingHealth(health.HealthServicer):
    def __init__(self, calls: list[int], index: int) -> None:
        super().__init__()
        self.calls, self.index = calls, index

    def Check(self, request, context):
        self.calls[self.index] += 1
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
def credentials(tmp_path: Path) -> Path:
    init_tls(tmp_path, names=("store", "client"))
    return tmp_path


@contextlib.asynccontextmanager
async def _replicas(hosts: list[str], credentials: Path | None) -> AsyncIterator[Replicas]:
    calls = [0] * len(hosts)
    servers: list[grpc.aio.Server] = []
    addresses = []
    server_credentials = None
    if credentials is not None:
        ca, cert, key = tls_files(credentials, "store").read()
        server_credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca,
                                                         require_client_auth=True)
    try:
        for index, host in enumerate(hosts):
            server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(CountingHealth(calls, index), server)
            port = (server.add_secure_port(f"{host}:0", server_credentials) if server_credentials
                    else server.add_insecure_port(f"{host}:0"))
            await server.start()
            servers.append(server)
            addresses.append(f"{host}:{port}")
        yield Replicas(addresses, calls)
    finally:
        for server in servers:
            await server.stop(0)


@pytest.fixture(params=[False, True], ids=["plaintext", "mtls"])
async def replicas(request, credentials: Path) -> AsyncIterator[tuple[Replicas, Identity]]:
    tls = tls_files(credentials, "client") if request.param else None
    async with _replicas(["127.0.0.1", "127.0.0.1"], credentials if request.param else None) as running:
        yield running, Identity("client", None, tls)


async def _until_both_answered(stub: health_pb2_grpc.HealthStub, running: Replicas) -> None:
    """Calls until every replica has answered one: the first calls go to whichever connected first."""
    for _ in range(200):
        if min(running.calls) > 0:
            return
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    raise AssertionError(f"a replica never got a call: {running.calls}")


async def test_calls_alternate_over_every_replica(replicas) -> None:
    running, identity = replicas
    async with make_channel(",".join(running.addresses), identity, traced=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        await _until_both_answered(stub, running)
        running.calls[:] = [0, 0]
        for _ in range(10):
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert running.calls == [5, 5]


async def test_a_replica_that_is_down_is_skipped(credentials: Path) -> None:
    async with _replicas(["127.0.0.1"], credentials) as running:
        # The second address has no server: round robin sends every call to the one that answers.
        down = running.addresses[0].rsplit(":", 1)[0] + ":1"
        identity = Identity("client", None, tls_files(credentials, "client"))
        async with make_channel(f"{running.addresses[0]},{down}", identity, traced=False) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for _ in range(4):
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert running.calls == [4]


async def test_with_tls_replicas_on_different_hosts_need_a_server_name(credentials: Path) -> None:
    identity = Identity("client", None, tls_files(credentials, "client"))
    async with _replicas(["127.0.0.1", "127.0.0.2"], credentials) as running:
        target = ",".join(running.addresses)
        with pytest.raises(InvalidArgument, match="server_name"):
            make_channel(target, identity)
        # Every certificate init-tls makes carries the service's own name.
        async with make_channel(target, identity, traced=False, server_name="store") as channel:
            await _until_both_answered(health_pb2_grpc.HealthStub(channel), running)
