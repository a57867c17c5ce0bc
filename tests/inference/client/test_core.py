"""Node state, ejection and picking, without sockets."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from services.common.errors import InvalidArgument
from services.inference.client.config import BalancerSettings, load_balancer_settings
from services.inference.client.core.node_state import EjectionPolicy, Health, LoadReport, NodeState
from services.inference.client.core.picker import NoNodeAvailable, Picker, PickerConfig, Typical

POLICY = EjectionPolicy(eject_after_failures=3, base_s=2.0, max_s=10.0)


def make_nodes(*addresses: str, ttft_ms: float | None = 20.0) -> dict[str, NodeState]:
    nodes = {}
    for address in addresses:
        node = NodeState(address, ewma_alpha=0.5)
        node.set_health(True)
        if ttft_ms is not None:
            node.record_ttft(ttft_ms)
        nodes[address] = node
    return nodes


def make_picker(**overrides) -> Picker:
    return Picker(PickerConfig(**overrides), rng=random.Random(7))


def test_ewma_follows_samples_with_alpha() -> None:
    node = NodeState("a:1", ewma_alpha=0.5)
    node.record_ttft(100)
    node.record_ttft(200)
    assert node.ttft_ms.value == pytest.approx(150)


def test_consecutive_failures_eject_with_growing_delays() -> None:
    node = make_nodes("a:1")["a:1"]
    now = 100.0
    assert not node.record_failure(now, POLICY)
    assert not node.record_failure(now, POLICY)
    assert node.record_failure(now, POLICY)
    assert node.is_ejected(now + 1.9) and not node.is_ejected(now + 2.0)
    now += 2.0
    for _ in range(3):
        node.record_failure(now, POLICY)
    assert node.is_ejected(now + 3.9) and not node.is_ejected(now + 4.0), "second ejection doubles"
    now += 4.0
    for _ in range(3):
        node.record_failure(now, POLICY)
    now += 8.0
    for _ in range(3):
        node.record_failure(now, POLICY)
    assert node.ejected_until == now + 10.0, "capped at max_s"


def test_success_breaks_the_failure_streak_and_long_health_resets_level() -> None:
    node = make_nodes("a:1")["a:1"]
    node.record_failure(0, POLICY)
    node.record_failure(0, POLICY)
    node.record_success(0, POLICY)
    assert not node.record_failure(0, POLICY), "streak restarted"
    for _ in range(3):
        node.record_failure(1, POLICY)
    assert node.ejection_level == 1
    node.record_success(3 + POLICY.max_s, POLICY)
    assert node.ejection_level == 0


def test_unhealthy_and_ejected_nodes_are_never_picked() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    nodes["a:1"].set_health(False)
    for _ in range(3):
        nodes["b:1"].record_failure(0.0, POLICY)
    picker = make_picker()
    picked = {picker.choose(nodes, now=1.0).node.address for _ in range(50)}
    assert picked == {"c:1"}


def test_no_available_node_raises() -> None:
    nodes = make_nodes("a:1")
    nodes["a:1"].health = Health.UNKNOWN
    with pytest.raises(NoNodeAvailable):
        make_picker().choose(nodes, now=0.0)


def test_exclude_skips_nodes_already_tried() -> None:
    nodes = make_nodes("a:1", "b:1")
    assert make_picker().choose(nodes, 0.0, exclude={"a:1"}).node.address == "b:1"


def test_p2c_sends_less_to_a_slow_node() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    nodes["c:1"].ttft_ms.value = 60.0  # three times slower
    picker = make_picker()
    counts: Counter[str] = Counter()
    # Queueing simulation: two arrivals per tick; a fast node finishes one
    # request per tick, the slow one a request every third tick.
    for tick in range(300):
        for _ in range(2):
            node = picker.choose(nodes, 0.0).node
            node.num_inflight += 1
            counts[node.address] += 1
        for address, node in nodes.items():
            if node.num_inflight and (address != "c:1" or tick % 3 == 0):
                node.num_inflight -= 1
    assert counts["c:1"] < 0.6 * min(counts["a:1"], counts["b:1"])


def test_p2c_prefers_the_less_loaded_of_equal_nodes() -> None:
    nodes = make_nodes("a:1", "b:1")
    nodes["a:1"].set_load(LoadReport(queue_depth=5, num_running=4))
    picks = Counter(make_picker().choose(nodes, 0.0).node.address for _ in range(20))
    assert picks == {"b:1": 20}


def test_kv_usage_raises_cost() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker()
    base = picker.cost(nodes["a:1"], Typical(20.0, 0.0))
    nodes["a:1"].set_load(LoadReport(kv_usage=0.9))
    assert picker.cost(nodes["a:1"], Typical(20.0, 0.0)) > 1.8 * base


def test_node_without_samples_is_costed_like_its_peers() -> None:
    nodes = make_nodes("a:1", "b:1")
    nodes["c:1"] = NodeState("c:1", ewma_alpha=0.5)
    nodes["c:1"].set_health(True)
    picker = make_picker(initial_ttft_ms=10_000)
    typical = picker._fallback(nodes.values())
    assert picker.cost(nodes["c:1"], typical) == picker.cost(nodes["a:1"], typical)


def test_session_stays_when_an_idle_peer_has_no_inter_token_samples_yet() -> None:
    # The holder has streamed (TTFT and ITL known); the peer has only a TTFT.
    # Missing ITL counts as the peers' median, not as zero, so the holder
    # does not look "4x slower" and the session keeps its KV cache.
    nodes = make_nodes("a:1", "b:1", ttft_ms=5.0)
    nodes["a:1"].record_itl(20.0)
    picker = make_picker()
    picker.remember("session:s1", "a:1")
    picks = {picker.choose(nodes, 0.0, key="session:s1").node.address for _ in range(10)}
    assert picks == {"a:1"}


def test_session_sticks_to_its_node_under_normal_load() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    picker = make_picker()
    key = picker.affinity_key("s-1")
    first = picker.choose(nodes, 0.0, key).node.address
    for other in nodes.values():
        other.num_inflight = 1
    nodes[first].num_inflight = 2  # slightly busier than the others: still sticks
    picks = [picker.choose(nodes, 0.0, key) for _ in range(20)]
    assert {p.node.address for p in picks} == {first}
    assert {p.reason for p in picks} == {"affinity"}


def test_session_leaves_an_overloaded_node_and_sticks_to_the_new_one() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    picker = make_picker(affinity_max_queue_depth=4)
    key = picker.affinity_key("s-1")
    first = picker.choose(nodes, 0.0, key).node.address
    nodes[first].set_load(LoadReport(queue_depth=4, num_running=8, num_sequences=8))
    moved = picker.choose(nodes, 0.0, key).node.address
    assert moved != first
    nodes[first].set_load(LoadReport())
    assert picker.choose(nodes, 0.0, key).node.address == moved


def test_session_leaves_a_node_far_slower_than_the_rest() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker(affinity_latency_ratio=4.0)
    picker.remember("session:s", "a:1")
    nodes["a:1"].ttft_ms.value = 60.0  # 3x slower: the KV cache there is still worth it
    assert picker.choose(nodes, 0.0, "session:s").node.address == "a:1"
    nodes["a:1"].ttft_ms.value = 100.0  # 5x slower: move
    assert picker.choose(nodes, 0.0, "session:s").node.address == "b:1"


def test_decode_speed_decides_slowness_once_measured() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker(affinity_latency_ratio=4.0)
    picker.remember("session:s", "a:1")
    nodes["a:1"].ttft_ms.value = 200.0  # long prompts or a queue, not a slow node
    nodes["a:1"].itl_ms.value, nodes["b:1"].itl_ms.value = 12.0, 4.0
    assert picker.choose(nodes, 0.0, "session:s").node.address == "a:1"
    nodes["a:1"].itl_ms.value = 20.0
    assert picker.choose(nodes, 0.0, "session:s").node.address == "b:1"


def test_busy_node_keeps_its_sessions_until_its_queue_is_clearly_longer() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker(affinity_max_queue_depth=2)
    picker.remember("session:s", "a:1")
    for node in nodes.values():
        node.set_load(LoadReport(num_running=4, num_sequences=4))
    nodes["a:1"].num_inflight = 5  # one waiting for a sequence
    assert picker.choose(nodes, 0.0, "session:s").reason == "affinity"
    nodes["a:1"].num_inflight = 6  # two waiting, none on b: move
    assert picker.choose(nodes, 0.0, "session:s").node.address == "b:1"
    picker.remember("session:s", "a:1")
    nodes["b:1"].num_inflight = 6  # everyone equally overloaded: stay
    assert picker.choose(nodes, 0.0, "session:s").node.address == "a:1"


def test_session_stays_on_a_node_whose_cache_is_full_of_reusable_cells() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker(affinity_max_kv_usage=0.95)
    picker.remember("session:s", "a:1")
    nodes["a:1"].set_load(LoadReport(num_running=1, num_sequences=4, kv_usage=0.99))
    assert picker.choose(nodes, 0.0, "session:s").reason == "affinity", "nothing waits: the cells are reusable"
    nodes["a:1"].set_load(LoadReport(queue_depth=1, num_running=4, num_sequences=4, kv_usage=0.99))
    assert picker.choose(nodes, 0.0, "session:s").node.address == "b:1", "full of work, b has room"


def test_session_moves_when_its_node_goes_down() -> None:
    nodes = make_nodes("a:1", "b:1")
    picker = make_picker()
    picker.remember("session:s", "a:1")
    nodes["a:1"].set_health(False)
    assert picker.choose(nodes, 0.0, "session:s").node.address == "b:1"
    assert picker.holder_of("session:s") == "b:1"


def test_prefix_routing_groups_long_shared_prompts_only() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    picker = make_picker(prefix_affinity_chars=8)
    first = picker.choose(nodes, 0.0, prefix=picker.prefix_query("", "system: be brief. user: hi"))
    # Same first 8-character block: the node the first one went to, before any poll.
    again = [picker.choose(nodes, 0.0, prefix=picker.prefix_query("", "system: be terse")) for _ in range(10)]
    assert {(p.node.address, p.reason) for p in again} == {(first.node.address, "prefix")}
    short = [picker.choose(nodes, 0.0, prefix=picker.prefix_query("", "short")) for _ in range(10)]
    assert {p.reason for p in short} == {"p2c"}, "no full block: nothing to match"
    assert picker.affinity_key("s") == "session:s" and picker.affinity_key(None) is None
    assert make_picker(prefix_affinity_chars=0).prefix_query("", "system: be brief") is None


def test_affinity_table_is_bounded() -> None:
    picker = make_picker(affinity_table_size=2)
    for i in range(3):
        picker.remember(f"session:{i}", "a:1")
    assert picker.holder_of("session:0") is None and picker.holder_of("session:2") == "a:1"


def test_round_robin_cycles_over_healthy_nodes() -> None:
    nodes = make_nodes("a:1", "b:1", "c:1")
    nodes["c:1"].set_health(False)
    picker = make_picker(strategy="round_robin")
    assert [picker.choose(nodes, 0.0, "session:s").node.address for _ in range(4)] == ["a:1", "b:1", "a:1", "b:1"]


def test_settings_read_nodes_from_the_inference_environment() -> None:
    settings = load_balancer_settings(environ={"LLMESH_INFERENCE_NODES": "127.0.0.1:1, dns:inference:50051"})
    assert settings.nodes == ("127.0.0.1:1", "dns:inference:50051")


@pytest.mark.parametrize(("field", "value"), [("nodes", ("no-port",)), ("strategy", "random"),
                                              ("max_attempts", 0), ("ewma_alpha", 0.0)])
def test_bad_settings_name_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidArgument) as raised:
        BalancerSettings(**{field: value})
    assert raised.value.field == field


def test_session_on_the_only_node_stays_there() -> None:
    nodes = make_nodes("a:1", ttft_ms=5.0)
    nodes["a:1"].record_itl(20.0)
    picker = make_picker()
    picker.remember("session:s1", "a:1")
    pick = picker.choose(nodes, 0.0, key="session:s1")
    assert pick.node.address == "a:1" and pick.reason == "affinity"
