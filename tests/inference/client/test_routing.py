"""Model registry, router, fallback chain and the small-then-large cascade."""
from __future__ import annotations

import asyncio
import json

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from services.inference.client.cascade import Answer, AnswerCheck, cascade
from services.inference.client.routing import (
    ModelProfile,
    ModelRegistry,
    ModelRouter,
    RouteRequest,
    estimate_complexity,
    run_with_fallback,
)

GGUF = "gemma-3-270m-q4_k_m.gguf"
SMALL = ModelProfile("gemma-fast", frozenset({"chat"}), context_tokens=2048, cost_per_1k_tokens=0.1,
                     ms_per_token=5, tier=0, gguf=GGUF, defaults={"temperature": 0.0, "max_tokens": 64})
SMALL_JSON = ModelProfile("gemma-json", frozenset({"chat", "grammar"}), context_tokens=2048, cost_per_1k_tokens=0.1,
                          ms_per_token=6, tier=0, gguf=GGUF, defaults={"temperature": 0.0})
LARGE = ModelProfile("big", frozenset({"chat", "grammar", "long_context"}), context_tokens=32768,
                     cost_per_1k_tokens=2.0, ms_per_token=40, tier=1, gguf="big.gguf")


@pytest.fixture
def registry() -> ModelRegistry:
    registry = ModelRegistry()
    for node in ("node-a", "node-b"):
        registry.register(node, SMALL)
        registry.register(node, SMALL_JSON)
    registry.register("node-gpu", LARGE)
    return registry


def test_one_gguf_is_served_under_several_names(registry):
    assert registry.names_of_file(GGUF) == ["gemma-fast", "gemma-json"]
    assert registry.models_of("node-a") == ["gemma-fast", "gemma-json"]
    assert registry.nodes_of("big") == ["node-gpu"]
    with pytest.raises(ValueError):
        registry.register("node-c", ModelProfile("gemma-fast", tier=3))


def test_easy_prompt_goes_to_the_cheap_model_hard_one_to_the_strong_one(registry):
    router = ModelRouter(registry)
    easy = router.chain(RouteRequest(prompt_tokens=20, max_tokens=32, complexity=estimate_complexity("hi there")))
    assert [p.name for p in easy][0] in ("gemma-fast", "gemma-json") and easy[-1].name == "big"
    hard_prompt = "Explain why this design is slow, compare the trade-offs and plan a refactor:\n```\ndef f(): ...\n```"
    assert estimate_complexity(hard_prompt) >= 0.5 > estimate_complexity("hi there")
    hard = router.chain(RouteRequest(prompt_tokens=20, max_tokens=32, complexity=estimate_complexity(hard_prompt)))
    assert [p.name for p in hard] == ["big", "gemma-fast", "gemma-json"]


def test_capabilities_context_and_budgets_filter_models(registry):
    router = ModelRouter(registry)
    grammar = router.chain(RouteRequest(prompt_tokens=10, max_tokens=10, capabilities=frozenset({"grammar"})))
    assert [p.name for p in grammar] == ["gemma-json", "big"]
    long_prompt = router.chain(RouteRequest(prompt_tokens=4000, max_tokens=100))
    assert [p.name for p in long_prompt] == ["big"]
    cheap = router.chain(RouteRequest(prompt_tokens=500, max_tokens=500, complexity=0.9, max_cost=0.5))
    assert "big" not in [p.name for p in cheap]
    fast = router.chain(RouteRequest(prompt_tokens=10, max_tokens=100, max_latency_ms=1000))
    assert "big" not in [p.name for p in fast]
    with pytest.raises(FailedPrecondition) as caught:
        router.chain(RouteRequest(prompt_tokens=4000, max_tokens=100, max_cost=0.01))
    assert caught.value.reason == "NO_MODEL_FITS"


def test_a_node_leaving_removes_its_models_from_routing(registry):
    registry.unregister_node("node-gpu")
    chain = ModelRouter(registry).chain(RouteRequest(prompt_tokens=10, max_tokens=10, complexity=1.0))
    assert "big" not in [p.name for p in chain]


async def test_failed_primary_model_falls_back_to_the_next():
    calls: list[str] = []

    async def call(profile: ModelProfile) -> str:
        calls.append(profile.name)
        if profile.name == "gemma-fast":
            raise Unavailable("no healthy node serves gemma-fast")
        if profile.name == "gemma-json":
            await asyncio.sleep(1.0)  # times out
        return f"answer from {profile.name}"

    routed = await run_with_fallback([SMALL, SMALL_JSON, LARGE], call, timeout_s=0.05)
    assert routed.value == "answer from big" and routed.model == "big" and routed.fell_back
    assert calls == ["gemma-fast", "gemma-json", "big"]
    assert [a.model for a in routed.failed] == ["gemma-fast", "gemma-json"]


async def test_request_errors_do_not_fall_back_and_exhausted_chain_is_unavailable():
    async def bad(profile: ModelProfile) -> str:
        raise InvalidArgument("prompt: empty", field="prompt")

    with pytest.raises(InvalidArgument):
        await run_with_fallback([SMALL, LARGE], bad)

    async def down(profile: ModelProfile) -> str:
        raise Unavailable("down")

    with pytest.raises(Unavailable) as caught:
        await run_with_fallback([SMALL, LARGE], down)
    assert caught.value.reason == "NO_MODEL_AVAILABLE" and "gemma-fast" in caught.value.message


def answers(by_model: dict[str, Answer]):
    called: list[str] = []

    async def call(profile: ModelProfile) -> Answer:
        called.append(profile.name)
        return by_model[profile.name]

    return call, called


async def test_cascade_keeps_a_confident_small_answer():
    call, called = answers({"gemma-fast": Answer("Paris", (-0.1, -0.2)), "big": Answer("Paris.")})
    result = await cascade(SMALL, LARGE, call, AnswerCheck(min_mean_logprob=-1.0))
    assert (result.model, result.escalated, called) == ("gemma-fast", False, ["gemma-fast"])


async def test_cascade_escalates_on_a_forced_low_confidence_answer():
    call, called = answers({"gemma-fast": Answer("Lyon?", (-2.5, -3.1, -4.0)), "big": Answer("Paris")})
    result = await cascade(SMALL, LARGE, call, AnswerCheck(min_mean_logprob=-1.0))
    assert (result.model, result.escalated, result.reason) == ("big", True, "low_confidence")
    assert result.answer.text == "Paris" and called == ["gemma-fast", "big"]


def is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("small_answer,check,reason", [
    (Answer("not json"), AnswerCheck(validator=is_json), "invalid"),
    (Answer(" "), AnswerCheck(min_chars=1), "too_short"),
    (Answer("x" * 500), AnswerCheck(max_chars=100), "too_long"),
    (Answer("{}"), AnswerCheck(min_mean_logprob=-1.0, require_logprobs=True), "no_logprobs"),
])
async def test_cascade_escalates_when_the_answer_fails_its_check(small_answer, check, reason):
    call, _ = answers({"gemma-fast": small_answer, "big": Answer('{"ok": true}')})
    result = await cascade(SMALL, LARGE, call, check)
    assert result.escalated and result.reason == reason and result.model == "big"
