"""The OpenAI-compatible endpoints, driven by the official ``openai`` package."""
from __future__ import annotations

import json

import openai
import pytest

from services.common.runtime import running_service
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from tests.gateway.conftest import Mesh

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}


def client_for(mesh: Mesh, key: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=mesh.url + "/v1", api_key=key or mesh.keys.acme, max_retries=0)


async def test_chat_completion_non_stream(mesh: Mesh):
    async with client_for(mesh) as client:
        reply = await client.chat.completions.create(
            model="gemma-3-270m", max_tokens=16, temperature=0, seed=7,
            messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}])
    assert reply.choices[0].message.content == "Hello from llmesh"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 3 and reply.usage.total_tokens == reply.usage.prompt_tokens + 3
    sent = mesh.generator.requests[0]
    assert sent.prompt == ("<start_of_turn>user\nBe brief.\n\nSay hi<end_of_turn>\n<start_of_turn>model\n")
    assert (sent.max_tokens, sent.temperature, sent.seed, sent.model) == (16, 0.0, 7, "gemma-3-270m")
    assert "<end_of_turn>" in sent.stop and sent.grammar == ""


async def test_the_answer_names_the_model_that_served_it_and_the_tenant_travels(mesh: Mesh):
    # Behind a balancer, "auto" (or a fallback) may be served by another name than asked for.
    mesh.generator.answered_by = "gemma-fast"
    async with client_for(mesh) as client:
        reply = await client.chat.completions.create(model="auto", max_tokens=8,
                                                     messages=[{"role": "user", "content": "Say hi"}])
        stream = await client.completions.create(model="auto", prompt="Say hi", max_tokens=8, stream=True)
        pieces = [piece async for piece in stream]
    assert reply.model == "gemma-fast"
    assert pieces[0].model == "auto" and pieces[-1].model == "gemma-fast"
    assert [r.model for r in mesh.generator.requests] == ["auto", "auto"]
    assert {r.tenant_id for r in mesh.generator.requests} == {"acme"}


async def test_chat_completion_stream_with_usage(mesh: Mesh):
    async with client_for(mesh) as client:
        stream = await client.chat.completions.create(
            model="gemma-3-270m", stream=True, stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Say hi"}])
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from llmesh"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("stream", [False, True])
async def test_required_tool_call_uses_a_grammar_and_returns_tool_calls(mesh: Mesh, stream: bool):
    mesh.generator.text = '{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}'
    async with client_for(mesh) as client:
        kwargs = dict(model="gemma-3-270m", tools=[WEATHER_TOOL], tool_choice="required",
                      messages=[{"role": "user", "content": "Weather in Paris?"}])
        if stream:
            chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
            calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)
        else:
            reply = await client.chat.completions.create(**kwargs)
            calls, finish = reply.choices[0].message.tool_calls, reply.choices[0].finish_reason
            assert reply.choices[0].message.content is None
    assert finish == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "days": 2}
    sent = mesh.generator.requests[0]
    assert '"\\"get_weather\\""' in sent.grammar and '"\\"city\\""' in sent.grammar
    assert "get_weather" in sent.prompt


async def test_tool_results_go_back_to_the_model(mesh: Mesh):
    async with client_for(mesh) as client:
        await client.chat.completions.create(model="gemma-3-270m", tools=[WEATHER_TOOL], messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    prompt = mesh.generator.requests[0].prompt
    assert '<start_of_turn>model\n{"name": "get_weather", "arguments": {"city": "Oslo"}}<end_of_turn>' in prompt
    assert "Result of call_1:\nsunny" in prompt and prompt.endswith("<start_of_turn>model\n")


async def test_completions_and_models(mesh: Mesh):
    async with client_for(mesh) as client:
        reply = await client.completions.create(model="gemma-3-270m", prompt="Once upon", max_tokens=5)
        chunks = [c async for c in await client.completions.create(model="gemma-3-270m", prompt="Once", stream=True)]
        models = await client.models.list()
    assert reply.choices[0].text == "Hello from llmesh" and reply.usage.completion_tokens == 3
    assert "".join(c.choices[0].text for c in chunks) == "Hello from llmesh"
    assert mesh.generator.requests[0].prompt == "Once upon"
    assert [m.id for m in models.data] == ["gemma-3-270m"]


async def test_bad_requests_name_the_parameter(mesh: Mesh):
    async with client_for(mesh) as client:
        for kwargs, param in [
            (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
            (dict(messages=[{"role": "user", "content": "x"}], temperature=5), "temperature"),
            (dict(messages=[{"role": "user", "content": "x"}], n=9), "n"),
            (dict(messages=[{"role": "user", "content": "x"}], tools=[WEATHER_TOOL],
                  tool_choice={"type": "function", "function": {"name": "nope"}}), "tool_choice.function.name"),
        ]:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(model="gemma-3-270m", **kwargs)
            assert caught.value.body["param"] == param, caught.value.body
    assert mesh.generator.requests == []


async def test_wrong_key_is_authentication_error(mesh: Mesh):
    async with client_for(mesh, key="lmk_zzz_nope") as client:
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "x"}])


@pytest.mark.model
@pytest.mark.slow
async def test_real_inference_through_the_balancer(model_path, keys, authenticator):
    """The bundled model behind a real inference node, reached through the load balancer."""
    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    node_settings = InferenceSettings(port=0, model_path=str(model_path), n_ctx=1024, n_seq_max=2, n_gpu_layers=0)
    async with running_service(build_inference(node_settings), node_settings) as node:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",)), authenticator=authenticator)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
                plain = await client.chat.completions.create(
                    model="gemma-3-270m", max_tokens=8, temperature=0,
                    messages=[{"role": "user", "content": "Count: one, two,"}])
                chunks = [c async for c in await client.chat.completions.create(
                    model="gemma-3-270m", max_tokens=8, temperature=0, stream=True,
                    stream_options={"include_usage": True}, messages=[{"role": "user", "content": "Count: one, two,"}])]
                tool = await client.chat.completions.create(
                    model="gemma-3-270m", max_tokens=64, temperature=0, tools=[WEATHER_TOOL], tool_choice="required",
                    messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert plain.usage.completion_tokens >= 1 and plain.usage.prompt_tokens > 5
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content  # greedy: same text either way
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    if tool.choices[0].finish_reason == "length":
        pytest.fail(f"grammar-constrained call did not finish in 64 tokens: {tool.choices[0].message.content!r}")
    call = tool.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    assert "city" in arguments and set(arguments) <= {"city", "days"}  # days is optional


@pytest.mark.parametrize("stream", [False, True])
async def test_n_choices_come_back_each_with_its_index(mesh: Mesh, stream: bool):
    async with client_for(mesh) as client:
        kwargs = dict(model="gemma-3-270m", n=3, messages=[{"role": "user", "content": "Say hi"}])
        if stream:
            chunks = [c async for c in await client.chat.completions.create(
                stream=True, stream_options={"include_usage": True}, **kwargs)]
            texts = {i: "".join(c.choices[0].delta.content or "" for c in chunks
                                if c.choices and c.choices[0].index == i) for i in range(3)}
            finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            reply = await client.chat.completions.create(**kwargs)
            texts = {c.index: c.message.content for c in reply.choices}
            finishes = [c.finish_reason for c in reply.choices]
            usage = reply.usage
        completion = await client.completions.create(model="gemma-3-270m", prompt="Once", n=2)
    assert texts == {0: "Hello from llmesh", 1: "Hello from llmesh", 2: "Hello from llmesh"}
    assert finishes == ["stop"] * 3
    assert usage.completion_tokens == 9, "each choice's tokens count; the prompt counts once"
    assert [c.index for c in completion.choices] == [0, 1]
    assert mesh.generator.requests[0].n == 3


@pytest.mark.model
@pytest.mark.slow
async def test_n_choices_on_the_real_node_prefill_the_prompt_once(model_path, keys, authenticator):
    from prometheus_client import REGISTRY

    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    def counted(name: str) -> float:
        return sum(s.value for metric in REGISTRY.collect() if metric.name == name
                   for s in metric.samples if s.name == name + "_total")

    node_settings = InferenceSettings(port=0, model_path=str(model_path), n_ctx=1024, n_seq_max=4, n_gpu_layers=0)
    async with running_service(build_inference(node_settings), node_settings) as node:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",)), authenticator=authenticator)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
                before = (counted("llmesh_inference_prompt_tokens"), counted("llmesh_inference_cached_tokens"))
                reply = await client.chat.completions.create(
                    model="gemma-3-270m", n=3, max_tokens=8, temperature=1.0, seed=3,
                    messages=[{"role": "user", "content": "Name three things that are blue."}])
                after = (counted("llmesh_inference_prompt_tokens"), counted("llmesh_inference_cached_tokens"))
    prompt = reply.usage.prompt_tokens
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert all(c.message.content for c in reply.choices)
    prompted, cached = after[0] - before[0], after[1] - before[1]
    assert prompted == 3 * prompt and prompted - cached == prompt + 2, "one prefill, then one token per fork"
