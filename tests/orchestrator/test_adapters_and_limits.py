"""Small parts: rate limits, retries, the inference adapter over a load balancer."""
from __future__ import annotations

import random

import pytest
from llmesh.inference.v1 import inference_pb2

from services.common.errors import ResourceExhausted, Unavailable
from services.orchestrator.adapters.grpc_inference import GrpcInference
from services.orchestrator.core.ports import GenerationRequest
from services.orchestrator.core.rate_limit import RateLimiter
from services.orchestrator.core.retry import RetryPolicy, with_retries
from tests.orchestrator.builders import collect, make_rig


def test_model_limit_refuses_without_charging_the_tenant():
    now = [0.0]
    limiter = RateLimiter(tenant_rate_per_s=1, tenant_burst=2, model_rate_per_s=1, model_burst=1,
                          clock=lambda: now[0])
    limiter.admit("t", "m")
    with pytest.raises(ResourceExhausted) as err:
        limiter.admit("t", "m")
    assert err.value.reason == "MODEL_RATE_LIMITED" and err.value.retry_after_ms == 1000
    limiter.admit("t", "other-model")  # the refused run did not use up the tenant's second token
    with pytest.raises(ResourceExhausted):
        limiter.admit("t", "third-model")
    now[0] = 1.0
    limiter.admit("t", "m")


async def test_retries_stop_at_the_policy_and_only_for_transient_errors():
    calls = []

    async def flaky():
        calls.append(1)
        raise Unavailable("down")

    with pytest.raises(Unavailable):
        await with_retries(flaky, RetryPolicy(max_attempts=3, base_delay_s=0.001), rng=random.Random(1))
    assert len(calls) == 3
    delays = [RetryPolicy(base_delay_s=0.1, max_delay_s=0.3).delay_s(a, random.Random(a)) for a in range(6)]
    assert all(0 <= d <= 0.3 for d in delays)


class FakeBalancer:
    """What services.inference.client.Balancer offers: unary(method, request) and generate(request)."""

    def __init__(self) -> None:
        self.calls = []

    async def unary(self, method, request, **_kw):
        self.calls.append(method)
        if method == "Tokenize":
            return inference_pb2.TokenizeResponse(tokens=[1, 2, 3])
        return inference_pb2.CountTokensResponse(n_ctx=4096)

    async def generate(self, request, *, session_id=None, **_kw):
        self.calls.append(("Generate", session_id, list(request.prompt_tokens), request.sampling.grammar,
                           request.tenant_id))
        yield inference_pb2.GenerateResponse(text="hi")
        yield inference_pb2.GenerateResponse(text="", finish_reason=inference_pb2.FINISH_REASON_STOP,
                                             usage=inference_pb2.Usage(prompt_tokens=3, generated_tokens=1,
                                                                       ttft_ms=12.5))


async def test_inference_adapter_goes_through_a_balancer():
    balancer = FakeBalancer()
    inference = GrpcInference(balancer)
    assert await inference.tokenize("x") == [1, 2, 3]
    assert await inference.context_size() == 4096
    chunks = [c async for c in inference.generate(GenerationRequest(
        request_id="r", prompt_tokens=(1, 2, 3), session_id="s1", grammar="root ::= \"hi\"", tenant_id="acme"))]
    assert [c.text for c in chunks] == ["hi", ""]
    assert chunks[-1].finish_reason == "stop" and chunks[-1].ttft_ms == 12.5
    assert chunks[-1].usage.prompt_tokens == 3
    assert balancer.calls[-1] == ("Generate", "s1", [1, 2, 3], 'root ::= "hi"', "acme")


async def test_a_retried_run_request_joins_the_run_it_started():
    rig = make_rig(["only once"])
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="same", tenant_id="acme", session_id=session.session_id,
                                             user_message="hi")
    again, replay = await rig.orchestrator.run(request_id="same", tenant_id="acme",
                                               session_id=session.session_id, user_message="hi")
    assert again is run
    first, second = await collect(events), await collect(replay)
    assert [e.seq for e in first] == [e.seq for e in second] and len(rig.inference.requests) == 1
    # The node is told whose turn it is (its per-tenant settings apply).
    assert rig.inference.requests[0].tenant_id == "acme"
