"""The gRPC surface on an in-process server with the synthetic backend."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_channel


def synthetic_settings(**overrides) -> Settings:
    values = dict(port=0, backend="synthetic", n_ctx=256, n_seq_max=2, synthetic_tokens_per_s=0.0, max_queue=4)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
async def stub():
    async with running_service(build_app(synthetic_settings()), synthetic_settings()) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)


def gen_request(prompt: str = "hello", max_tokens: int = 5, **kw) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(max_tokens=max_tokens), **kw)


async def collect(stub, request) -> list[pb.GenerateResponse]:
    return [reply async for reply in stub.Generate(request)]


async def test_generate_streams_deltas_and_ends_with_usage(stub):
    replies = await collect(stub, gen_request(max_tokens=6))
    assert len(replies) == 6
    assert all(len(r.token_ids) == 1 for r in replies)
    last = replies[-1]
    assert last.finish_reason == pb.FINISH_REASON_LENGTH
    assert last.usage.generated_tokens == 6
    assert last.usage.prompt_tokens == len("hello") + 1
    assert last.usage.ttft_ms > 0
    assert "".join(r.text for r in replies)


async def test_logprobs_come_with_each_token_its_bytes_and_the_likeliest_tokens(stub):
    replies = await collect(stub, gen_request(max_tokens=4, logprobs=True, top_logprobs=3))
    plain = await collect(stub, gen_request(max_tokens=4, logprobs=True))
    assert all(len(r.logprobs) == len(r.token_pieces) == len(r.top_logprobs) == 1 for r in replies)
    assert b"".join(p for r in replies for p in r.token_pieces).decode() == "".join(r.text for r in replies)
    for reply in replies:
        (alternatives,) = reply.top_logprobs
        assert len(alternatives.token_ids) == len(alternatives.pieces) == 3
        assert list(alternatives.logprobs) == sorted(alternatives.logprobs, reverse=True)
        assert alternatives.token_ids[0] == reply.token_ids[0]
    assert [r.logprobs for r in plain] == [r.logprobs for r in replies]
    assert all(not r.top_logprobs and len(r.token_pieces) == 1 for r in plain)


async def test_n_choices_prefill_the_prompt_once_and_stream_each_with_its_index(stub):
    prompt = "a prompt of some length " * 4
    replies = await collect(stub, gen_request(prompt, max_tokens=5, n=2))
    by_choice = {i: [r for r in replies if r.index == i] for i in (0, 1)}
    assert all(len(choice) == 5 for choice in by_choice.values())
    first, second = (choice[-1].usage for choice in by_choice.values())
    assert first.prompt_tokens == second.prompt_tokens == len(prompt) + 1
    # The second choice copied the first one's cells of all but the prompt's last token.
    assert first.cached_tokens == 0 and second.cached_tokens == first.prompt_tokens - 1
    assert all(choice[-1].finish_reason == pb.FINISH_REASON_LENGTH for choice in by_choice.values())


async def test_session_follow_up_reports_cached_tokens(stub):
    first = await collect(stub, gen_request("turn one ", session_id="s"))
    text = "turn one " + "".join(r.text for r in first) + " next"
    second = await collect(stub, gen_request(text, session_id="s"))
    assert second[-1].usage.cached_tokens > len("turn one ")
    load = await stub.GetLoad(pb.GetLoadRequest())
    assert load.num_sessions == 1
    released = await stub.ReleaseSession(pb.ReleaseSessionRequest(session_id="s"))
    assert released.released
    assert (await stub.GetLoad(pb.GetLoadRequest())).num_sessions == 0


@pytest.mark.parametrize("request_,field", [
    (pb.GenerateRequest(prompt=""), "prompt"),
    (gen_request(max_tokens=0), "sampling.max_tokens"),
    (gen_request(max_tokens=-3), "sampling.max_tokens"),
    (gen_request("x" * 400), "prompt"),
    (pb.GenerateRequest(prompt_tokens=[5, 99999], sampling=pb.SamplingParams(max_tokens=1)), "prompt_tokens"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=1, grammar="nonsense")),
     "sampling.grammar"),
    (pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=1, top_p=1.5)), "sampling.top_p"),
    (gen_request(logprobs=True, top_logprobs=21), "top_logprobs"),
    (gen_request(top_logprobs=2), "top_logprobs"),
    (gen_request(n=3), "n"),  # more choices than the node's 2 sequences
    (gen_request(n=2, session_id="s"), "n"),
])
async def test_bad_input_is_invalid_argument_naming_the_field(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == field
    assert field in caught.value.details()


async def test_unknown_session_is_not_found_when_cache_required(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(stub, gen_request(session_id="ghost", require_cached_session=True))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(caught.value).metadata["field"] == "session_id"


async def test_tokenize_count_tokens_and_detokenize(stub):
    tokens = (await stub.Tokenize(pb.TokenizeRequest(text="abc", add_special=True))).tokens
    assert len(tokens) == 4
    count = await stub.CountTokens(pb.CountTokensRequest(text="abc", add_special=True))
    assert count.num_tokens == 4 and count.n_ctx == 256
    assert (await stub.Detokenize(pb.DetokenizeRequest(tokens=tokens))).text == "abc"
    models = await stub.ListModels(pb.ListModelsRequest())
    assert models.models[0].n_ctx == 256


async def test_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Tokenize(pb.TokenizeRequest(model="gpt-9", text="a"))
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_overload_answers_resource_exhausted_and_cancel_frees_sequences():
    settings = synthetic_settings(synthetic_tokens_per_s=100.0, max_queue=2, n_seq_max=2, n_ctx=8192)
    async with running_service(build_app(settings), settings) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            calls = [stub.Generate(gen_request(f"p{i}", max_tokens=10_000)) for i in range(4)]
            # Arrival order is up to the transport: wait until two run and two wait.
            for _ in range(100):
                load = await stub.GetLoad(pb.GetLoadRequest())
                if load.num_running == 2 and load.queue_depth == 2:
                    break
                await asyncio.sleep(0.02)
            assert load.num_running == 2 and load.queue_depth == 2 and load.num_free_sequences == 0
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await collect(stub, gen_request("one too many"))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "QUEUE_FULL"
            for call in calls:
                call.cancel()
            for _ in range(50):
                load = await stub.GetLoad(pb.GetLoadRequest())
                if load.num_running == 0 and load.queue_depth == 0:
                    break
                await asyncio.sleep(0.02)
            assert load.num_running == 0 and load.queue_depth == 0
            assert load.num_free_sequences == 2
