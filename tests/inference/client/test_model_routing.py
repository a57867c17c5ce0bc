"""Model-aware picks, "auto" routing and fallback chains in the balancer, against real synthetic nodes."""
from __future__ import annotations

import json

import pytest
from llmesh.inference.v1 import inference_pb2
from prometheus_client import REGISTRY

from services.common import errors
from services.inference.client import BalancerSettings
from tests.inference.client.conftest import collect, gen_request, make_balancer
from tests.inference.client.synthetic_nodes import SyntheticNodeSpec, synthetic_nodes
from tests.support.waiting import wait_until

PROFILES = json.dumps({"small": {"tier": 0, "cost_per_1k_tokens": 0.1},
                       "large": {"tier": 1, "cost_per_1k_tokens": 1.0}})
HARD_PROMPT = ("Explain step by step why this design is slow, compare the trade-offs and optimize it:\n"
               "```\ndef scan(rows):\n    for r in rows: {}\n```\nWhy? How? What would you refactor?")


def small_and_large(**large: object):
    return synthetic_nodes(SyntheticNodeSpec("small-node", model_name="small"),
                           SyntheticNodeSpec("large-node", model_name="large", **large))


def addresses(nodes) -> list[str]:
    return [f"127.0.0.1:{n.port}" for n in nodes]


def routed(model: str, fell_back: bool) -> float:
    return REGISTRY.get_sample_value("llmesh_balancer_routed_total",
                                     {"model": model, "fell_back": str(fell_back).lower()}) or 0.0


def request(model: str, prompt: str = "hello there") -> inference_pb2.GenerateRequest:
    req = gen_request(prompt, max_tokens=4)
    req.model = model
    return req


async def test_a_named_model_goes_only_to_nodes_that_serve_it():
    async with small_and_large() as nodes:
        async with make_balancer(addresses(nodes), model_profiles=PROFILES) as balancer:
            assert {s.models and next(iter(s.models)) for s in balancer.nodes.values()} == {"small", "large"}
            for model, node_id in (("small", "small-node"), ("large", "large-node")):
                for _ in range(6):
                    replies = await collect(balancer, request(model))
                    assert {r.node_id for r in replies} == {node_id}
                    assert replies[-1].model == model


async def test_auto_sends_easy_prompts_to_the_cheap_model_and_hard_ones_up_a_tier():
    async with small_and_large() as nodes:
        async with make_balancer(addresses(nodes), model_profiles=PROFILES) as balancer:
            assert balancer.model_chain(request("auto")) == ["small", "large"]
            assert balancer.model_chain(request("auto", HARD_PROMPT)) == ["large", "small"]
            before = routed("large", False)
            easy = await collect(balancer, request("auto"))
            hard = await collect(balancer, request("auto", HARD_PROMPT))
            assert (easy[-1].model, easy[-1].node_id) == ("small", "small-node")
            assert (hard[-1].model, hard[-1].node_id) == ("large", "large-node")
            assert routed("large", False) - before == 1


async def test_auto_keeps_to_the_request_budget_and_the_tenant_cap():
    async with small_and_large() as nodes:
        tenants = json.dumps({"frugal": {"route_max_cost": 0.05}})
        async with make_balancer(addresses(nodes), model_profiles=PROFILES, tenant_policies=tenants) as balancer:
            hard = request("auto", HARD_PROMPT)
            assert balancer.model_chain(hard) == ["large", "small"]
            # ~50 tokens (prompt estimate + 4 generated): large costs ~0.05, small ~0.005.
            hard.route_max_cost = 0.01
            assert balancer.model_chain(hard) == ["small"]
            capped = request("auto", HARD_PROMPT)
            capped.tenant_id = "frugal"
            capped.sampling.max_tokens = 100
            assert balancer.model_chain(capped) == ["small"], "the tenant's cap applies without a request budget"
            hard.route_max_cost = 0.0001
            with pytest.raises(errors.FailedPrecondition) as info:
                await collect(balancer, hard)
            assert info.value.reason == "NO_MODEL_FITS"
            slow = request("auto", HARD_PROMPT)
            slow.route_max_latency_ms = 1.0
            with pytest.raises(errors.FailedPrecondition):
                balancer.model_chain(slow)


async def test_auto_refuses_token_prompts_naming_the_field():
    async with small_and_large() as nodes:
        async with make_balancer(addresses(nodes)) as balancer:
            req = inference_pb2.GenerateRequest(model="auto", prompt_tokens=[2, 3, 4])
            with pytest.raises(errors.InvalidArgument) as info:
                await collect(balancer, req)
            assert info.value.field == "model"


async def test_a_model_whose_nodes_are_gone_falls_back_to_the_next():
    async with synthetic_nodes(SyntheticNodeSpec("small-node", model_name="small"),
                               SyntheticNodeSpec("large-node", model_name="large")) as nodes:
        chained = make_balancer(addresses(nodes), model_profiles=PROFILES,
                                model_fallbacks=json.dumps({"large": ["small"]}))
        plain = make_balancer(addresses(nodes), model_profiles=PROFILES)
        async with chained, plain:
            assert (await collect(chained, request("large")))[-1].model == "large"
            await nodes[1].stop()
            large = addresses(nodes)[1]
            assert await wait_until(lambda: not chained.nodes[large].is_available(0.0)
                                    and not plain.nodes[large].is_available(0.0), 5.0)
            before = routed("small", True)
            replies = await collect(chained, request("large"))
            assert (replies[-1].model, replies[-1].node_id) == ("small", "small-node")
            assert routed("small", True) - before == 1
            # Without a fallback chain the same outage is a clear UNAVAILABLE.
            with pytest.raises(errors.Unavailable) as info:
                await collect(plain, request("large"))
            assert "serving model 'large'" in str(info.value)


async def test_a_model_slow_to_start_is_left_for_the_next_after_fallback_after_s():
    async with small_and_large(ttft_ms=3000.0) as nodes:
        async with make_balancer(addresses(nodes), model_profiles=PROFILES, fallback_after_s=0.3,
                                 model_fallbacks=json.dumps({"large": ["small"]})) as balancer:
            replies = await collect(balancer, request("large"))
            assert (replies[-1].model, replies[-1].node_id) == ("small", "small-node")
            # The abandoned attempt freed its sequence on the slow node.
            large = addresses(nodes)[1]
            assert await wait_until(lambda: balancer.nodes[large].num_inflight == 0, 5.0)


async def test_every_model_failing_names_each_one():
    async with synthetic_nodes(SyntheticNodeSpec("small-node", model_name="small")) as nodes:
        async with make_balancer(addresses(nodes), model_fallbacks=json.dumps({"gone": ["also-gone"]})) as balancer:
            with pytest.raises(errors.Unavailable) as info:
                await collect(balancer, request("gone"))
            assert info.value.reason == "NO_MODEL_AVAILABLE"
            assert "gone (" in str(info.value) and "also-gone (" in str(info.value)


def cascade_settings(min_mean_logprob: float) -> str:
    return json.dumps({"cascade": {"small": "small", "large": "large", "min_mean_logprob": min_mean_logprob}})


def escalations(outcome: str) -> float:
    return REGISTRY.get_sample_value("llmesh_balancer_cascade_total", {"cascade": "cascade", "outcome": outcome}) or 0.0


async def test_a_cascade_keeps_a_confident_small_answer():
    async with small_and_large() as nodes:
        # Synthetic log-probabilities lie in [-0.9, 0]: a -1.0 floor keeps every small answer.
        async with make_balancer(addresses(nodes), model_cascades=cascade_settings(-1.0)) as balancer:
            before = escalations("kept")
            replies = await collect(balancer, request("cascade"))
            assert (replies[-1].model, replies[-1].node_id) == ("small", "small-node")
            assert not any(r.logprobs for r in replies), "log-probabilities only when the caller asked"
            assert escalations("kept") - before == 1
            several = request("cascade")
            several.n = 2
            with pytest.raises(errors.InvalidArgument) as info:
                await collect(balancer, several)
            assert info.value.field == "n"


async def test_a_cascade_escalates_a_forced_low_confidence_answer_to_the_large_model():
    async with small_and_large() as nodes:
        # A floor above every synthetic log-probability forces "low confidence".
        async with make_balancer(addresses(nodes), model_cascades=cascade_settings(0.5)) as balancer:
            before = escalations("low_confidence")
            replies = await collect(balancer, request("cascade"))
            assert (replies[-1].model, replies[-1].node_id) == ("large", "large-node")
            assert escalations("low_confidence") - before == 1


async def test_a_cascade_whose_small_model_is_gone_escalates():
    async with synthetic_nodes(SyntheticNodeSpec("large-node", model_name="large")) as nodes:
        async with make_balancer(addresses(nodes), model_cascades=cascade_settings(-1.0)) as balancer:
            replies = await collect(balancer, request("cascade"))
            assert replies[-1].model == "large"


@pytest.mark.parametrize("field, value", [
    ("tenant_policies", '{"t": {"route_max_cost": -1}}'),
    ("model_cascades", '{"c": {"small": "a"}}'),
    ("model_cascades", '{"c": {"small": "a", "large": "b", "min_mean_logprob": "low"}}'),
    ("model_cascades", '{"c": {"small": "a", "large": "d"}, "d": {"small": "a", "large": "c"}}'),
    ("model_profiles", '{"small": {"tier": "high"}}'),
    ("model_profiles", '{"small": {"speed": 3}}'),
    ("model_fallbacks", '{"large": "small"}'),
    ("model_fallbacks", '{"large": ["large"]}'),
    ("route_tier_thresholds", '{"one": 0.5}'),
    ("route_tier_thresholds", "not json"),
])
def test_bad_routing_settings_are_refused_naming_the_setting(field, value):
    with pytest.raises(errors.InvalidArgument) as info:
        BalancerSettings(nodes=("127.0.0.1:1",), **{field: value})
    assert info.value.field == field
