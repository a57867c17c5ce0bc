"""Health pushed over a grpc.health.v1 Watch stream reaches the balancer at once."""
from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.identity import tls_files
from services.inference.client.core.node_state import Health
from tests.inference.client.conftest import collect, gen_request, make_balancer
from tests.inference.client.fake_node import SERVICE_NAME, FakeInferenceServicer, FakeNodeConfig
from tests.support.auth import CREDENTIALS, TLS
from tests.support.waiting import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# A long poll interval, so a change seen within half of it was pushed; half
# of it is also slack enough for a loaded machine.
HEALTH_INTERVAL_S = 10.0
PUSHED_WITHIN_S = HEALTH_INTERVAL_S / 2


@contextlib.asynccontextmanager
async def bare_node(node_id: str) -> AsyncIterator[tuple[str, health.aio.HealthServicer, grpc.aio.Server]]:
    """A node on a plain grpc.aio server whose health service streams Watch replies.

    It serves mutual TLS with the inference certificate in a TLS run, as the balancer then expects.
    """
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(FakeInferenceServicer(FakeNodeConfig(node_id=node_id)),
                                                              server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if TLS:
        ca, cert, key = tls_files(CREDENTIALS, "inference").read()
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=ca, require_client_auth=True))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await health_servicer.set(SERVICE_NAME, SERVING)
    try:
        yield f"127.0.0.1:{port}", health_servicer, server
    finally:
        await server.stop(0)


async def test_watch_stream_reports_drain_and_return_immediately() -> None:
    async with bare_node("a") as (address, health_servicer, _server), bare_node("b") as (other, _h, _s):
        async with make_balancer([address, other], health_interval_s=HEALTH_INTERVAL_S) as balancer:
            state = balancer.nodes[address]
            assert state.health is Health.SERVING
            assert balancer._links[address].health_mode == "watch"
            await health_servicer.set(SERVICE_NAME, NOT_SERVING)
            # Well inside one health interval: the change is pushed, not polled.
            assert await wait_until(lambda: state.health is Health.NOT_SERVING, PUSHED_WITHIN_S)
            replies = [await collect(balancer, gen_request()) for _ in range(4)]
            await health_servicer.set(SERVICE_NAME, SERVING)
            assert await wait_until(lambda: state.health is Health.SERVING, PUSHED_WITHIN_S)
    assert {r[-1].node_id for r in replies} == {"b"}


async def test_broken_watch_stream_marks_the_node_down() -> None:
    async with bare_node("a") as (address, _health, server):
        async with make_balancer([address], health_interval_s=HEALTH_INTERVAL_S) as balancer:
            state = balancer.nodes[address]
            await server.stop(0)
            assert await wait_until(lambda: state.health is Health.NOT_SERVING, PUSHED_WITHIN_S)
