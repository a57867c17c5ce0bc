"""Merging, the response cache and priority classes through the gRPC surface (synthetic backend)."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc
from prometheus_client import REGISTRY

from services.common.errors import InvalidArgument
from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.config import Settings
from services.inference.core.front import semantic_text
from services.inference.core.semantic_cache import HashingEmbedder
from services.inference.server import build_app, priority_policy, semantic_cache
from tests.support.auth import service_channel
from tests.support.waiting import wait_until


def settings(**overrides) -> Settings:
    values = dict(port=0, backend="synthetic", n_ctx=2048, n_seq_max=4, synthetic_tokens_per_s=300.0,
                  response_cache_entries=16)
    values.update(overrides)
    return Settings(**values)


def engine_requests(svc) -> int:
    """Requests the node's engine actually decoded (one sampler each)."""
    return svc.app.pool.engines[0].backend.samplers_opened


def metric(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def gen(prompt: str = "shared prompt", max_tokens: int = 10, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


async def collect(stub, request) -> list[pb.GenerateResponse]:
    return [reply async for reply in stub.Generate(request)]


@pytest.fixture
async def node():
    config = settings()
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # The key's first call runs the KDF; concurrent requests must then arrive together, as in the mesh.
            await stub.GetLoad(pb.GetLoadRequest())
            yield svc, stub


async def test_eight_identical_rpcs_cause_one_decode_and_say_they_were_merged(node):
    svc, stub = node
    merged_before = metric("llmesh_inference_merged_requests_total")
    replies = await asyncio.gather(*(collect(stub, gen(max_tokens=20)) for _ in range(8)))
    assert engine_requests(svc) == 1
    texts = {"".join(r.text for r in reply) for reply in replies}
    assert len(texts) == 1 and len(texts.pop()) == 20
    assert sum(reply[-1].merged for reply in replies) == 7
    assert metric("llmesh_inference_merged_requests_total") - merged_before == 7


async def test_cached_answer_is_marked_and_never_reaches_the_engine(node):
    svc, stub = node
    hits_before = metric("llmesh_inference_response_cache_lookups_total", result="hit")
    first = await collect(stub, gen())
    calls = svc.app.pool.engines[0].backend.decode_count
    second = await collect(stub, gen())
    assert svc.app.pool.engines[0].backend.decode_count == calls
    assert all(r.cached for r in second) and not any(r.cached for r in first)
    assert [r.text for r in second] == [r.text for r in first]
    assert second[-1].usage.cached_tokens == second[-1].usage.prompt_tokens
    assert metric("llmesh_inference_response_cache_lookups_total", result="hit") - hits_before == 1
    assert 0.0 < metric("llmesh_inference_response_cache_hit_ratio") <= 1.0
    fresh = await collect(stub, gen(skip_cache=True))
    assert not fresh[-1].cached and svc.app.pool.engines[0].backend.decode_count > calls


async def test_cache_is_off_unless_configured():
    config = settings(response_cache_entries=0)
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await collect(stub, gen())
            again = await collect(stub, gen())
            assert not again[-1].cached and engine_requests(svc) == 2


async def test_batch_class_queue_limit_is_resource_exhausted_while_interactive_still_runs():
    config = settings(n_seq_max=2, synthetic_tokens_per_s=100.0, max_waiting_batch=1)
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            flood = [stub.Generate(gen(f"batch {i}", max_tokens=5000, priority=pb.PRIORITY_BATCH)) for i in range(2)]
            load = None

            async def one_runs_one_waits() -> bool:  # the other sequence is reserved
                nonlocal load
                load = await stub.GetLoad(pb.GetLoadRequest())
                return (load.num_running, load.queue_depth) == (1, 1)

            assert await wait_until(one_runs_one_waits, timeout_s=10), load
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, gen("one more batch", priority=pb.PRIORITY_BATCH))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "CLASS_QUEUE_FULL"
            interactive = await collect(stub, gen("now", max_tokens=3, priority=pb.PRIORITY_INTERACTIVE))
            assert interactive[-1].usage.generated_tokens == 3
            for call in flood:
                call.cancel()


@pytest.mark.parametrize("field", ["batch_reserved_sequences", "max_waiting_batch", "max_wait_ms_normal"])
def test_negative_priority_settings_are_refused_naming_the_field(field):
    with pytest.raises(InvalidArgument) as caught:
        priority_policy(settings(**{field: -1}))
    assert caught.value.field == field


async def test_one_model_is_served_under_alias_names_with_their_own_defaults():
    config = settings(model_aliases="fast:max_tokens=3;warm:temperature=0.8,seed=11,max_tokens=5",
                      response_cache_entries=0)
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            names = [m.name for m in (await stub.ListModels(pb.ListModelsRequest())).models]
            assert names == ["gemma-3-270m", "fast", "warm"]
            fast = await collect(stub, pb.GenerateRequest(model="fast", prompt="hi"))
            assert fast[-1].usage.generated_tokens == 3
            # A field the request sets wins over the alias's default.
            longer = await collect(stub, pb.GenerateRequest(model="fast", prompt="hi",
                                                            sampling=pb.SamplingParams(max_tokens=7)))
            assert longer[-1].usage.generated_tokens == 7
            warm = await collect(stub, pb.GenerateRequest(model="warm", prompt="hi"))
            assert warm[-1].usage.generated_tokens == 5
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, pb.GenerateRequest(model="cold", prompt="hi"))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND and "'fast'" in caught.value.details()


@pytest.mark.parametrize("aliases", ["fast:temperature", "fast:colour=red", "fast:top_k=many", "a b:x=1",
                                     "fast:max_tokens=1;fast:max_tokens=2"])
def test_bad_alias_settings_are_refused_naming_the_field(aliases):
    with pytest.raises(InvalidArgument) as caught:
        build_app(settings(model_aliases=aliases))
    assert caught.value.field == "model_aliases"


async def test_semantic_cache_hit_is_marked_cached_and_counted():
    config = settings(response_cache_entries=0, semantic_cache_entries=8, semantic_cache_threshold=0.8)
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            hits = metric("llmesh_inference_semantic_cache_lookups_total", result="hit")
            await collect(stub, gen("What is the capital of France?", semantic_cache=True))
            similar = await collect(stub, gen("what's the capital of France", semantic_cache=True))
            assert similar[-1].cached and engine_requests(svc) == 1
            assert metric("llmesh_inference_semantic_cache_lookups_total", result="hit") - hits == 1
            assert metric("llmesh_inference_semantic_cache_hit_ratio") > 0


async def test_tenant_policies_keep_answers_within_a_tenant_and_apply_its_settings():
    policies = '{"nocache": {"cache": false, "merge": false}, "free": {"max_priority": "batch"}}'
    config = settings(tenant_policies=policies, n_seq_max=2, synthetic_tokens_per_s=100.0)
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            await collect(stub, gen(tenant_id="acme"))
            assert (await collect(stub, gen(tenant_id="acme")))[-1].cached
            # Another tenant's identical request is not served from acme's answer.
            assert not (await collect(stub, gen(tenant_id="globex")))[-1].cached
            # A tenant with cache and merging off decodes every request.
            before = engine_requests(svc)
            both = await asyncio.gather(*(collect(stub, gen(tenant_id="nocache")) for _ in range(2)))
            assert not any(r[-1].cached or r[-1].merged for r in both) and engine_requests(svc) - before == 2
            # A free-tier "interactive" request is queued as batch: it cannot take the reserved sequence.
            hog = stub.Generate(gen("long batch", max_tokens=5000, priority=pb.PRIORITY_BATCH))
            await hog.read()
            free = stub.Generate(gen("free", max_tokens=2, priority=pb.PRIORITY_INTERACTIVE, tenant_id="free"))
            load = None

            async def free_is_queued() -> bool:
                # As interactive it would be admitted in the step that takes it: (2, 0), never (1, 1).
                nonlocal load
                load = await stub.GetLoad(pb.GetLoadRequest())
                return (load.num_running, load.queue_depth) == (1, 1)

            assert await wait_until(free_is_queued, timeout_s=10), load
            hog.cancel()
            assert [r async for r in free][-1].usage.generated_tokens == 2


def test_bad_tenant_policies_are_refused_naming_the_field():
    with pytest.raises(InvalidArgument) as caught:
        build_app(settings(tenant_policies='{"t": {"cache": "sometimes"}}'))
    assert caught.value.field == "tenant_policies"


async def test_logprobs_come_with_each_token_only_when_asked(node):
    _, stub = node
    with_logprobs = await collect(stub, gen("confidence", logprobs=True, skip_cache=True))
    assert all(len(r.logprobs) == len(r.token_ids) for r in with_logprobs)
    assert all(-10.0 < lp <= 0.0 for r in with_logprobs for lp in r.logprobs)
    without = await collect(stub, gen("confidence", skip_cache=True))
    assert not any(r.logprobs for r in without)


async def test_cascade_over_node_aliases_escalates_on_a_low_confidence_answer():
    from services.inference.client.cascade import Answer, AnswerCheck, cascade
    from services.inference.client.routing import ModelProfile

    config = settings(model_aliases="small:max_tokens=4;large:max_tokens=9")
    async with running_service(build_app(config), config) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def call(profile: ModelProfile) -> Answer:
                replies = await collect(stub, pb.GenerateRequest(model=profile.name, prompt="2+2=", logprobs=True))
                return Answer("".join(r.text for r in replies), [lp for r in replies for lp in r.logprobs])

            small, large = ModelProfile("small"), ModelProfile("large", tier=1)
            confident = await cascade(small, large, call, AnswerCheck(min_mean_logprob=-1.0))
            assert (confident.model, confident.escalated, len(confident.answer.text)) == ("small", False, 4)
            # The synthetic node's log-probabilities are all below -0.0 on average: forced low confidence.
            doubtful = await cascade(small, large, call, AnswerCheck(min_mean_logprob=-0.0))
            assert (doubtful.model, doubtful.escalated, doubtful.reason) == ("large", True, "low_confidence")
            assert len(doubtful.answer.text) == 9


def test_the_semantic_text_drops_the_chat_markup():
    prompt = "<start_of_turn>user\nWhat is the capital of France?<end_of_turn>\n<start_of_turn>model\n"
    assert semantic_text(prompt) == "What is the capital of France?"


@pytest.mark.parametrize("overrides, field", [
    ({"semantic_embedder": "model"}, "semantic_embedder"),
    ({"semantic_embedder": "neural"}, "semantic_embedder"),
    ({"semantic_cache_threshold": 1.5}, "semantic_cache_threshold"),
])
def test_bad_semantic_settings_are_refused_naming_the_setting(overrides, field):
    with pytest.raises(InvalidArgument) as info:
        semantic_cache(settings(semantic_cache_entries=8, **overrides), SyntheticBackend())
    assert info.value.field == field


def test_the_synthetic_node_embeds_lexically_with_the_lexical_default_threshold():
    cache = semantic_cache(settings(semantic_cache_entries=8), SyntheticBackend())
    assert isinstance(cache.embedder, HashingEmbedder) and cache.threshold == 0.85


def test_a_negative_output_rows_multiple_is_refused_naming_the_setting():
    from services.inference.server import build_backends

    with pytest.raises(InvalidArgument) as info:
        build_backends(Settings(backend="llama", output_rows_multiple=-1))
    assert info.value.field == "output_rows_multiple"
