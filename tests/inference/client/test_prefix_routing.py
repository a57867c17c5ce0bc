"""Prefix-aware routing: the Picker sends a request where its prompt's leading text is cached.

Pure Picker and NodeState with an injected clock and rng, except the last
test, which runs real inference nodes on their synthetic backend.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Any

from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from prometheus_client import REGISTRY

from services.inference.client.core.node_state import LoadReport, NodeState
from services.inference.client.core.picker import Pick, Picker, PickerConfig
from services.inference.core.prefixes import text_prefix_hashes
from tests.inference.client.conftest import collect, gen_request, make_balancer
from tests.inference.client.synthetic_nodes import SyntheticNodeSpec, synthetic_nodes
from tests.support.auth import service_channel
from tests.support.waiting import wait_until

WIDTH = 16
SYSTEM = "You are a careful assistant. Answer briefly and cite sources. " * 2  # 7 full blocks of 16


def make_nodes(*addresses: str) -> dict[str, NodeState]:
    nodes = {}
    for address in addresses:
        node = NodeState(address, ewma_alpha=0.5)
        node.set_health(True)
        node.record_ttft(20.0)
        nodes[address] = node
    return nodes


def make_picker(**overrides: Any) -> Picker:
    return Picker(PickerConfig(**{"prefix_affinity_chars": WIDTH, **overrides}), rng=random.Random(7))


def holds(node: NodeState, text: str, tenant_id: str = "", blocks: int = 16) -> None:
    """``node``'s last poll reported the first ``blocks`` blocks of ``text`` for ``tenant_id``."""
    node.set_prefix_summary(WIDTH, text_prefix_hashes(tenant_id, text, WIDTH)[:blocks])


def route(picker: Picker, nodes: dict[str, NodeState], prompt: str, *, session: str | None = None,
          tenant_id: str = "", now: float = 0.0) -> Pick:
    return picker.choose(nodes, now, picker.affinity_key(session), prefix=picker.prefix_query(tenant_id, prompt))


def test_new_sessions_land_on_the_node_whose_summary_holds_their_prefix() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["b:1"], SYSTEM)
    picker = make_picker()
    picks = [route(picker, nodes, SYSTEM + f" user: question {i}", session=f"s-{i}") for i in range(20)]
    assert {(p.node.address, p.reason) for p in picks} == {("b:1", "prefix")}
    # Each session then sticks to b by its own affinity.
    assert route(picker, nodes, SYSTEM + " user: question 3, turn 2", session="s-3").reason == "affinity"


def test_deepest_match_wins_over_a_shallower_and_cheaper_one() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["a:1"], SYSTEM, blocks=2)
    holds(nodes["b:1"], SYSTEM, blocks=5)
    nodes["b:1"].num_inflight = 2  # busier, but not overloaded: five cached blocks beat two
    picker = make_picker()
    assert {route(picker, nodes, SYSTEM + f" q{i}").node.address for i in range(10)} == {"b:1"}


def test_equal_depth_goes_to_the_cheaper_node() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["a:1"], SYSTEM)
    holds(nodes["b:1"], SYSTEM)
    nodes["a:1"].num_inflight = 1
    pick = route(make_picker(), nodes, SYSTEM + " q")
    assert (pick.node.address, pick.reason) == ("b:1", "prefix")


def test_another_tenants_identical_text_does_not_match() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["b:1"], SYSTEM, tenant_id="acme")
    picker = make_picker()
    assert route(picker, nodes, SYSTEM + " q", tenant_id="acme").node.address == "b:1"
    other = route(make_picker(), nodes, SYSTEM + " q", tenant_id="globex")
    assert other.reason == "p2c"
    assert route(make_picker(), nodes, SYSTEM + " q").reason == "p2c", "no tenant is a tenant of its own"


def test_an_overloaded_holder_is_bypassed_for_power_of_two_choices() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["b:1"], SYSTEM)
    for node in nodes.values():
        node.set_load(LoadReport(num_running=4, num_sequences=4))
    nodes["b:1"].num_inflight = 8  # four waiting for a sequence, none elsewhere
    picker = make_picker(affinity_max_queue_depth=4)
    picks = [route(picker, nodes, SYSTEM + f" q{i}") for i in range(20)]
    assert picks[0].reason == "p2c"
    # The node that took the overflow holds the prefix too now: the next ones follow it there.
    assert "b:1" not in {p.node.address for p in picks}


def test_a_holder_whose_full_kv_cache_makes_requests_wait_is_bypassed() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["b:1"], SYSTEM)
    for node in nodes.values():
        node.set_load(LoadReport(num_running=4, num_sequences=8, kv_usage=0.5))
    # Full of cells kept for reuse, nothing waiting: the node frees them on demand.
    nodes["b:1"].set_load(LoadReport(num_running=4, num_sequences=8, kv_usage=0.97))
    assert route(make_picker(), nodes, SYSTEM + " q").node.address == "b:1"
    # Full, and a request waits for cells: the cache is taken by work.
    nodes["b:1"].set_load(LoadReport(queue_depth=1, num_running=4, num_sequences=8, kv_usage=0.97))
    pick = route(make_picker(affinity_max_kv_usage=0.95), nodes, SYSTEM + " q")
    assert pick.reason == "p2c" and pick.node.address != "b:1"
    # Every node as full: moving would only pay a full prefill elsewhere.
    for node in nodes.values():
        node.routed_prefixes.clear()
        node.set_load(LoadReport(queue_depth=1, num_running=4, num_sequences=8, kv_usage=0.97))
    assert route(make_picker(), nodes, SYSTEM + " q").node.address == "b:1"


def test_two_requests_with_a_new_prefix_land_together_before_any_poll() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    picker = make_picker()
    first = route(picker, nodes, SYSTEM + " first", now=10.0)
    second = route(picker, nodes, SYSTEM + " second", now=10.1)
    assert first.reason == "p2c" and second.reason == "prefix"
    assert second.node is first.node


def test_routed_prefixes_expire_unless_a_poll_confirms_them() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    picker = make_picker(prefix_routed_ttl_s=5.0)
    holder = route(picker, nodes, SYSTEM + " first", now=0.0).node
    assert route(picker, nodes, SYSTEM + " later", now=4.0).node is holder
    # No poll showed the prefix on the holder; the last route was at 4.0.
    assert route(picker, nodes, SYSTEM + " much later", now=9.5).reason == "p2c"
    holds(holder, SYSTEM)
    assert route(picker, nodes, SYSTEM + " confirmed", now=100.0).node is holder


def test_routed_prefixes_are_bounded_and_survive_an_empty_poll() -> None:
    node = make_nodes("a:1")["a:1"]
    hashes = text_prefix_hashes("", SYSTEM, WIDTH)
    node.note_routed(hashes, now=0.0, max_entries=3)
    assert list(node.routed_prefixes) == hashes[-3:], "the least recently routed go first"
    # A poll taken before the request was admitted shows nothing yet: the entries stay.
    node.set_prefix_summary(WIDTH, [])
    assert node.prefix_depth(hashes, now=1.0, routed_ttl_s=5.0) == len(hashes)
    assert node.prefix_depth(hashes, now=5.5, routed_ttl_s=5.0) == 0 and not node.routed_prefixes


def test_nodes_reporting_another_block_width_are_matched_in_their_width() -> None:
    nodes = make_nodes("a:1", "b:1")
    nodes["b:1"].set_prefix_summary(32, text_prefix_hashes("", SYSTEM, 32))
    pick = route(make_picker(), nodes, SYSTEM + " q")
    assert (pick.node.address, pick.reason) == ("b:1", "prefix")


def test_a_prompt_shorter_than_one_block_gets_power_of_two_choices() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    holds(nodes["b:1"], SYSTEM)
    picker = make_picker()
    picks = Counter(route(picker, nodes, SYSTEM[:WIDTH - 1]).reason for _ in range(10))
    assert picks == {"p2c": 10}


def test_token_prompts_get_no_prefix_routing() -> None:
    picker = make_picker()
    request = inference_pb2.GenerateRequest(prompt_tokens=[1, 2, 3] * 40, tenant_id="acme")
    assert picker.prefix_query(request.tenant_id, request.prompt) is None
    assert make_picker(prefix_affinity_chars=0).prefix_query("", SYSTEM) is None, "0 turns it off"


def prefix_picks(address: str) -> float:
    return REGISTRY.get_sample_value("llmesh_balancer_picks_total", {"node": address, "reason": "prefix"}) or 0.0


async def test_a_polled_prefix_summary_draws_a_new_session_to_its_node() -> None:
    # 3 blocks of the nodes' 256-character width, then a varying suffix.
    shared = ("system: you answer questions about the llmesh codebase, briefly. " * 12)[:3 * 256]
    specs = [SyntheticNodeSpec(f"n{i}", max_tokens=2) for i in range(3)]
    async with synthetic_nodes(*specs) as nodes:
        a = nodes[1]
        # The first request goes to node A straight, not through the balancer: only A's poll can tell.
        async with service_channel(a.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            first = gen_request(prompt=shared + " user: first question", max_tokens=2)
            _ = [reply async for reply in stub.Generate(first, timeout=30)]
        async with make_balancer([n.address for n in nodes]) as balancer:
            state = balancer.nodes[a.address]
            assert await wait_until(lambda: bool(state.prefix_blocks), 10.0), "A's poll showed no prefix"
            assert state.prefix_block_chars == 256 and not state.routed_prefixes
            before = prefix_picks(a.address)
            replies = await collect(balancer, gen_request(prompt=shared + " user: a different one", max_tokens=2,
                                                          session_id="new-session"))
            assert replies[-1].node_id == specs[1].node_id
            assert prefix_picks(a.address) == before + 1
            assert replies[-1].usage.cached_tokens >= len(shared)
            # The same bytes as token ids are not hashed: no prefix pick.
            tokens = [b + 2 for b in (shared + " user: tokens").encode()]
            await collect(balancer, inference_pb2.GenerateRequest(
                prompt_tokens=tokens, sampling=inference_pb2.SamplingParams(max_tokens=2)))
            assert prefix_picks(a.address) == before + 1
