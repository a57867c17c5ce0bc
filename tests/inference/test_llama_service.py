"""The gRPC service on the real model: streaming, cancellation, errors the model detects."""
from __future__ import annotations

import asyncio

import grpc
import pytest
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.interceptors import error_info
from services.common.runtime import running_service
from services.inference.client.grammar import schema_grammar
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_channel

pytestmark = pytest.mark.model


@pytest.fixture
async def stub(model_path):
    settings = Settings(port=0, backend="llama", model_path=str(model_path), n_ctx=512, n_seq_max=2,
                        n_threads=2, n_gpu_layers=0, node_id="node-a")
    async with running_service(build_app(settings), settings) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            yield inference_pb2_grpc.InferenceServiceStub(channel)


async def load_when(stub, condition, attempts: int = 100) -> pb.GetLoadResponse:
    """GetLoad until ``condition`` holds (or attempts run out); the last report."""
    for _ in range(attempts):
        load = await stub.GetLoad(pb.GetLoadRequest())
        if condition(load):
            break
        await asyncio.sleep(0.02)
    return load


async def test_generate_streams_text_and_usage_then_a_client_cancel_frees_the_sequence(stub):
    request = pb.GenerateRequest(prompt="The capital of France is", sampling=pb.SamplingParams(max_tokens=6))
    replies = [r async for r in stub.Generate(request)]
    text = "".join(r.text for r in replies)
    token_ids = [t for r in replies for t in r.token_ids]
    assert len(token_ids) == 6
    assert (await stub.Detokenize(pb.DetokenizeRequest(tokens=token_ids))).text == text
    assert replies[-1].usage.generated_tokens == 6 and replies[-1].node_id == "node-a"
    assert replies[-1].finish_reason == pb.FINISH_REASON_LENGTH

    call = stub.Generate(pb.GenerateRequest(prompt="List every prime number:",
                                            sampling=pb.SamplingParams(max_tokens=400)))
    await call.read()
    call.cancel()
    load = await load_when(stub, lambda load: load.num_running == 0)
    assert load.num_running == 0 and load.num_free_sequences == 2


async def test_model_side_validation_names_the_field(stub):
    too_long = pb.GenerateRequest(prompt="word " * 600, sampling=pb.SamplingParams(max_tokens=1))
    bad_grammar = pb.GenerateRequest(prompt="a", sampling=pb.SamplingParams(max_tokens=1, grammar="root ::= ("))
    for request, field in ((too_long, "prompt"), (bad_grammar, "sampling.grammar")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            [r async for r in stub.Generate(request)]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == field


async def test_count_tokens_matches_tokenize(stub):
    tokens = (await stub.Tokenize(pb.TokenizeRequest(text="<start_of_turn>user hi", add_special=True,
                                                     parse_special=True))).tokens
    count = await stub.CountTokens(pb.CountTokensRequest(text="<start_of_turn>user hi", add_special=True))
    assert count.num_tokens == len(tokens) and count.n_ctx == 512
    assert (await stub.Detokenize(pb.DetokenizeRequest(tokens=tokens[1:]))).text.endswith("user hi")


async def test_a_full_queue_answers_resource_exhausted_on_the_real_model(model_path):
    settings = Settings(port=0, backend="llama", model_path=str(model_path), n_ctx=512, n_seq_max=1,
                        n_threads=2, n_gpu_layers=0, max_queue=1)
    async with running_service(build_app(settings), settings) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            long = pb.SamplingParams(max_tokens=400)
            running = stub.Generate(pb.GenerateRequest(prompt="List every prime number:", sampling=long))
            await running.read()  # decoding in the only sequence
            waiting = stub.Generate(pb.GenerateRequest(prompt="Count to one thousand:", sampling=long))
            load = await load_when(stub, lambda load: load.queue_depth == 1)
            assert load.num_running == 1 and load.queue_depth == 1
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Generate(pb.GenerateRequest(prompt="One more", sampling=long)).read()
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert error_info(caught.value).reason == "QUEUE_FULL"
            running.cancel()
            waiting.cancel()


BIG_GRAMMAR = schema_grammar({"type": "object", "properties": {
    f"field_{i}": {"type": "array", "items": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 40}, "kind": {"enum": [f"k{j}" for j in range(20)]},
        "size": {"type": "integer"}}, "required": ["name", "kind"]}, "maxItems": 8} for i in range(40)}},
    max_string_chars=64, max_items=8)


async def test_stopping_a_node_under_load_never_reads_freed_weights(model_path):
    """Calls that tokenize or check a grammar on the event loop keep coming while the node stops: each either
    runs before the weights are freed or is refused; none reaches freed memory (which would kill the process)."""
    settings = Settings(port=0, backend="llama", model_path=str(model_path), n_ctx=512, n_seq_max=2,
                        n_threads=2, n_gpu_layers=0)
    app = build_app(settings)
    outcomes: dict[str, int] = {}
    stop = asyncio.Event()

    async def storm(stub) -> None:
        # A large grammar: checking it on the event loop takes a while (the window in which the weights went).
        grammar = pb.SamplingParams(max_tokens=2, grammar=BIG_GRAMMAR)
        while not stop.is_set():
            try:
                await stub.Tokenize(pb.TokenizeRequest(text="hello there " * 20))
                async for _ in stub.Generate(pb.GenerateRequest(prompt="Yes or no?", sampling=grammar)):
                    pass
                outcomes["ok"] = outcomes.get("ok", 0) + 1
            except grpc.aio.AioRpcError as err:
                outcomes[err.code().name] = outcomes.get(err.code().name, 0) + 1
                await asyncio.sleep(0.01)

    async with running_service(app, settings) as svc:
        async with service_channel(svc.address, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            storms = [asyncio.create_task(storm(stub)) for _ in range(4)]
            await asyncio.sleep(1.0)
            await app.close()  # while the storm goes on
            await asyncio.sleep(0.3)
            stop.set()
            await asyncio.gather(*storms, return_exceptions=True)
    assert outcomes.get("ok", 0) > 0 and outcomes.get("UNAVAILABLE", 0) > 0, outcomes
