"""logprobs and top_logprobs on chat and completions, streaming and not, from the node's own numbers."""
from __future__ import annotations

import openai
import pytest
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from services.common.runtime import running_service
from services.gateway.config import Settings
from services.gateway.core.chat_format import parse_messages, render_prompt
from services.gateway.server import build_app, running_gateway
from services.gemma.chat_format import END_OF_TURN
from tests.gateway.conftest import Mesh
from tests.gateway.test_openai import client_for
from tests.support.auth import service_channel

HI = [{"role": "user", "content": "Say hi"}]


async def test_chat_logprobs_non_stream_and_stream(mesh: Mesh):
    async with client_for(mesh) as client:
        reply = await client.chat.completions.create(model="gemma-3-270m", messages=HI, logprobs=True, top_logprobs=2)
        chunks = [c async for c in await client.chat.completions.create(
            model="gemma-3-270m", messages=HI, logprobs=True, stream=True)]
        plain = await client.chat.completions.create(model="gemma-3-270m", messages=HI)
    content = reply.choices[0].logprobs.content
    assert [(t.token, t.logprob) for t in content] == [("Hello", 0.0), (" from", -0.1), (" llmesh", -0.2)]
    assert content[1].bytes == list(b" from")
    assert [(a.token, a.logprob) for a in content[1].top_logprobs] == [("1a", -1.0), ("1b", -2.0)]
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == ["Hello", " from", " llmesh"]
    assert all(t.top_logprobs == [] for t in streamed)
    assert plain.choices[0].logprobs is None
    first, second, third = mesh.generator.requests
    assert (first.logprobs, first.top_logprobs, second.top_logprobs, third.logprobs) == (True, 2, 0, False)


async def test_completion_logprobs_in_the_legacy_shape(mesh: Mesh):
    async with client_for(mesh) as client:
        reply = await client.completions.create(model="gemma-3-270m", prompt="Once", logprobs=1)
        chunks = [c async for c in await client.completions.create(model="gemma-3-270m", prompt="Once", logprobs=0,
                                                                    stream=True)]
    logprobs = reply.choices[0].logprobs
    assert logprobs.tokens == ["Hello", " from", " llmesh"]
    assert logprobs.token_logprobs == [0.0, -0.1, -0.2]
    assert logprobs.top_logprobs == [{"0a": -1.0}, {"1a": -1.0}, {"2a": -1.0}]
    assert logprobs.text_offset == [0, 5, 10]
    offsets = [o for c in chunks if c.choices for o in c.choices[0].logprobs.text_offset]
    assert offsets == [0, 5, 10]


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(logprobs="yes"), "logprobs"),
])
async def test_bad_logprobs_name_the_field(mesh: Mesh, kwargs, param):
    async with client_for(mesh) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gemma-3-270m", messages=HI, **kwargs)
        assert caught.value.body["param"] == param
        with pytest.raises(openai.BadRequestError) as caught:
            await client.completions.create(model="gemma-3-270m", prompt="x", logprobs=6)
        assert caught.value.body["param"] == "logprobs"


@pytest.mark.model
@pytest.mark.slow
async def test_logprobs_are_the_nodes_own_for_the_same_greedy_decode(model_path, keys, authenticator):
    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    node_settings = InferenceSettings(port=0, model_path=str(model_path), n_ctx=1024, n_seq_max=2, n_gpu_layers=0)
    async with running_service(build_inference(node_settings), node_settings) as node:
        target = f"127.0.0.1:{node.port}"
        app = build_app(Settings(port=0, inference_nodes=(target,)), authenticator=authenticator)
        async with running_gateway(app) as url:
            # Each call runs cold: a node shares KV cells only within a tenant, and a prompt decoded
            # over reused cells may round differently from one prefilled whole (batch-size kernels).
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client, \
                    openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.globex, max_retries=0) as other:
                chat = await client.chat.completions.create(model="gemma-3-270m", messages=HI, max_tokens=8,
                                                            temperature=0, logprobs=True, top_logprobs=3)
                chunks = [c async for c in await other.chat.completions.create(
                    model="gemma-3-270m", messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3,
                    stream=True)]
                text = await client.completions.create(model="gemma-3-270m", prompt="The capital of France is",
                                                       max_tokens=6, temperature=0, logprobs=2)
        async with service_channel(target, "orchestrator") as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)

            async def node_decode(prompt: str, stop: list[str]) -> list[inference_pb2.GenerateResponse]:
                request = inference_pb2.GenerateRequest(
                    prompt=prompt, logprobs=True, top_logprobs=3, tenant_id=f"direct-{len(stop)}",
                    sampling=inference_pb2.SamplingParams(max_tokens=8 if stop else 6, stop=stop))
                return [reply async for reply in stub.Generate(request, timeout=60)]

            chat_replies = await node_decode(render_prompt(parse_messages(HI), []), [END_OF_TURN])
            text_replies = await node_decode("The capital of France is", [])
    own = [lp for r in chat_replies for lp in r.logprobs]
    own_top = [lp for r in chat_replies for alt in r.top_logprobs for lp in alt.logprobs]
    content = chat.choices[0].logprobs.content
    assert [t.logprob for t in content] == pytest.approx(own, abs=1e-6)
    assert [a.logprob for t in content for a in t.top_logprobs] == pytest.approx(own_top, abs=1e-6)
    # Greedy: the sampled token is the likeliest one.
    assert all(t.top_logprobs[0].token == t.token for t in content)
    streamed = [t.logprob for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(own, abs=1e-6)
    assert text.choices[0].logprobs.token_logprobs == pytest.approx(
        [lp for r in text_replies for lp in r.logprobs][:len(text.choices[0].logprobs.tokens)], abs=1e-6)
