"""The balancer against fake nodes served over real gRPC on loopback."""
from __future__ import annotations

import asyncio
import time
from collections import Counter

import pytest
from llmesh.inference.v1 import inference_pb2

from services.common import errors
from services.inference.client import Balancer
from services.inference.client.core.node_state import Health
from tests.inference.client.conftest import FAST_SETTINGS, collect, gen_request, make_balancer
from tests.inference.client.fake_node import FakeNodeConfig, fake_nodes
from tests.support.auth import service_identity
from tests.support.ports import free_port
from tests.support.waiting import wait_until

# Killed and drained nodes are seen through the health Watch stream. With a
# long poll interval, seeing them within half of it shows the change was
# pushed, with slack for a loaded machine.
HEALTH_INTERVAL_S = 10.0
PUSHED_WITHIN_S = HEALTH_INTERVAL_S / 2


async def test_generate_streams_every_token_and_frees_the_node() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="n1", num_tokens=5)) as nodes:
        async with make_balancer([n.address for n in nodes]) as balancer:
            replies = await collect(balancer, gen_request())
            state = balancer.nodes[nodes[0].address]
    assert "".join(r.text for r in replies) == " t0 t1 t2 t3 t4"
    assert replies[-1].finish_reason == inference_pb2.FINISH_REASON_LENGTH
    assert state.num_inflight == 0 and state.ttft_ms.value is not None and state.itl_ms.value is not None


async def test_no_healthy_node_fails_fast_with_unavailable() -> None:
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    async with make_balancer(dead, start_timeout_s=2.0) as balancer:
        started = time.monotonic()
        with pytest.raises(errors.Unavailable) as raised:
            async for _reply in balancer.generate(gen_request(), timeout=60):
                pass
        # Far inside the call's deadline: it did not wait for a node to come back.
        assert time.monotonic() - started < 10
    assert raised.value.reason == "NO_HEALTHY_NODE"


async def test_failure_before_first_token_is_retried_on_another_node() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="bad", fail_next=100), FakeNodeConfig(node_id="good")) as nodes:
        async with make_balancer([n.address for n in nodes], eject_after_failures=3) as balancer:
            results = [await collect(balancer, gen_request()) for _ in range(12)]
            bad_state = balancer.nodes[nodes[0].address]
    assert all(r[-1].node_id == "good" for r in results)
    assert 1 <= nodes[0].stats.num_requests <= 3, "ejected after three failures"
    assert bad_state.is_ejected(time.monotonic())


async def test_bad_request_is_not_retried_and_keeps_its_field() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="a"), FakeNodeConfig(node_id="b")) as nodes:
        async with make_balancer([n.address for n in nodes]) as balancer:
            with pytest.raises(errors.InvalidArgument) as raised:
                await collect(balancer, gen_request(prompt=""))
            with pytest.raises(errors.InvalidArgument) as unary_raised:
                await balancer.unary("CountTokens", inference_pb2.CountTokensRequest(text=""))
            counted = await balancer.unary("CountTokens", inference_pb2.CountTokensRequest(text="one two three"))
    assert raised.value.field == "prompt" and unary_raised.value.field == "text"
    assert sum(n.stats.num_requests for n in nodes) == 1
    assert counted.num_tokens == 3


async def test_failure_after_a_token_reaches_the_caller_without_retry() -> None:
    config = FakeNodeConfig(node_id="only", num_tokens=200, token_interval_ms=10)
    async with fake_nodes(config, FakeNodeConfig(node_id="spare")) as nodes:
        async with make_balancer([nodes[0].address, nodes[1].address]) as balancer:
            balancer._picker.remember("session:s", nodes[0].address)
            received = []
            with pytest.raises(errors.Unavailable) as raised:
                async for reply in balancer.generate(gen_request(session_id="s")):
                    received.append(reply)
                    if len(received) == 3:
                        await nodes[0].kill()
    assert raised.value.reason == "STREAM_BROKEN"
    assert raised.value.metadata["node"] == nodes[0].address
    assert nodes[1].stats.num_requests == 0, "no replay after tokens were streamed"


async def test_killed_node_stops_receiving_and_its_waiting_requests_finish_elsewhere() -> None:
    configs = [FakeNodeConfig(node_id=f"n{i}", num_sequences=1, num_tokens=40, token_interval_ms=10)
               for i in range(3)]
    async with fake_nodes(*configs) as nodes:
        async with make_balancer([n.address for n in nodes], max_attempts=3,
                                 health_interval_s=HEALTH_INTERVAL_S) as balancer:
            first_token: dict[int, bool] = {}

            async def run(i: int) -> str:
                first_token[i] = False
                node_id = ""
                async for reply in balancer.generate(gen_request(prompt=f"request {i}")):
                    first_token[i] = True
                    node_id = reply.node_id
                return node_id

            tasks = [asyncio.create_task(run(i)) for i in range(9)]
            assert await wait_until(lambda: any(n.app.servicer._num_waiting for n in nodes), 10.0)
            victim = max(nodes, key=lambda n: n.app.servicer._num_waiting)
            waiting_on_victim = victim.app.servicer._num_waiting
            await victim.kill()
            detected = await wait_until(lambda: balancer.nodes[victim.address].health is Health.NOT_SERVING,
                                        PUSHED_WITHIN_S)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            later = [await collect(balancer, gen_request()) for _ in range(6)]
    assert waiting_on_victim >= 1
    broken = [o for o in outcomes if isinstance(o, Exception)]
    # Only the request the victim was decoding (one sequence) had tokens; all
    # the ones waiting in its queue were retried and finished elsewhere.
    assert len(broken) <= 1 and all(isinstance(b, errors.Unavailable) for b in broken)
    assert sum(1 for o in outcomes if isinstance(o, str)) >= 8
    assert all(r[-1].node_id != victim.config.node_id for r in later)
    assert detected, "the killed node was not marked down from its health stream"


async def test_draining_node_is_avoided_within_one_health_interval() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="a"), FakeNodeConfig(node_id="b")) as nodes:
        async with make_balancer([n.address for n in nodes], health_interval_s=HEALTH_INTERVAL_S) as balancer:
            await nodes[0].running.health.enter_graceful_shutdown()
            assert await wait_until(lambda: balancer.nodes[nodes[0].address].health is Health.NOT_SERVING,
                                    PUSHED_WITHIN_S)
            served = Counter([(await collect(balancer, gen_request()))[-1].node_id for _ in range(6)])
    assert served == {"b": 6}


async def test_slower_node_receives_measurably_fewer_requests() -> None:
    # Delays of ~100 ms per request (~300 ms on the slow node) dwarf the CPU a
    # request costs even on a loaded machine, so the slow node is 3x slower in
    # fact. How many fewer it gets is measured by `make bench-balancer`.
    configs = [FakeNodeConfig(node_id=f"n{i}", ttft_ms=40, token_interval_ms=8, num_tokens=8) for i in range(3)]
    configs[2].slowdown = 3.0
    async with fake_nodes(*configs) as nodes:
        async with make_balancer([n.address for n in nodes]) as balancer:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(90):
                queue.put_nowait(i)

            async def client() -> None:
                while not queue.empty():
                    await collect(balancer, gen_request(prompt=f"request {queue.get_nowait()}"))

            await asyncio.gather(*(client() for _ in range(6)))
    fast = [nodes[0].stats.num_requests, nodes[1].stats.num_requests]
    slow = nodes[2].stats.num_requests
    assert sum(fast) + slow == 90
    assert slow < min(fast), (fast, slow)


async def test_sessions_stick_to_their_node_under_normal_load() -> None:
    configs = [FakeNodeConfig(node_id=f"n{i}", num_tokens=4) for i in range(3)]
    async with fake_nodes(*configs) as nodes:
        # The nodes are equally fast: a latency gap between them here is the test machine's scheduling
        # noise (milliseconds on a busy CPU), not a slow node, so only load may move a session.
        async with make_balancer([n.address for n in nodes], affinity_latency_ratio=1000.0) as balancer:

            async def conversation(session_id: str) -> None:
                history = "system prompt"
                for turn in range(4):
                    history += f" user turn {turn}"
                    await collect(balancer, gen_request(prompt=history, session_id=session_id))

            await asyncio.gather(*(conversation(f"s{i}") for i in range(12)))
    homes = Counter(session for n in nodes for session in n.stats.sessions_seen)
    assert len(homes) == 12 and set(homes.values()) == {1}, "every session stayed on one node"
    assert sum(n.stats.num_cache_hits for n in nodes) == 12 * 3
    assert sum(1 for n in nodes if n.stats.sessions_seen) >= 2, "sessions still spread over nodes"


async def test_dns_entry_becomes_nodes_and_follows_changes() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="a"), FakeNodeConfig(node_id="b")) as nodes:
        answers = {"inference.test": [nodes[0].address]}

        async def resolver(host: str, port: int) -> list[str]:
            return answers[host]

        balancer = Balancer("dns:inference.test:50051", FAST_SETTINGS.__class__(
            health_interval_s=0.3, load_interval_s=0.05, dns_refresh_s=0.05), resolver=resolver,
            identity=service_identity("orchestrator"))
        async with balancer:
            assert set(balancer.nodes) == {nodes[0].address}
            answers["inference.test"] = [nodes[1].address]
            assert await wait_until(lambda: set(balancer.nodes) == {nodes[1].address}, 10.0)
            await balancer.wait_for_health(2.0)
            reply = await collect(balancer, gen_request())
    assert reply[-1].node_id == "b"


async def test_real_dns_lookup_of_localhost() -> None:
    async with fake_nodes(FakeNodeConfig(node_id="a")) as nodes:
        port = nodes[0].running.port
        async with make_balancer([f"dns:localhost:{port}"]) as balancer:
            assert f"127.0.0.1:{port}" in balancer.nodes
            reply = await collect(balancer, gen_request())
    assert reply[-1].node_id == "a"


async def test_load_reports_reach_the_node_state() -> None:
    # Two of the four requests queue for about a second: long enough to be seen on a loaded machine.
    config = FakeNodeConfig(node_id="a", num_sequences=2, num_tokens=30, token_interval_ms=30)
    async with fake_nodes(config) as nodes:
        async with make_balancer([nodes[0].address]) as balancer:
            tasks = [asyncio.create_task(collect(balancer, gen_request(session_id=f"s{i}"))) for i in range(4)]
            state = balancer.nodes[nodes[0].address]
            assert await wait_until(lambda: state.load.queue_depth == 2 and state.load.num_running == 2, 10.0)
            assert state.node_id == "a" and state.load.num_sequences == 2
            await asyncio.gather(*tasks)
            assert await wait_until(lambda: state.load.kv_usage > 0 and state.load.queue_depth == 0, 10.0)
