"""response_format (json_object, json_schema) and strict tools: decoded under a grammar, or refused by JSON path."""
from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from services.common.runtime import running_service
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from tests.gateway.conftest import Mesh
from tests.gateway.schemas import PERSON, SCHEMAS
from tests.gateway.test_openai import WEATHER_TOOL, client_for


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": strict}}


async def test_a_json_schema_answer_is_decoded_under_its_grammar(mesh: Mesh):
    mesh.generator.text = '{"name": "Ada", "age": 36}'
    async with client_for(mesh) as client:
        reply = await client.chat.completions.create(
            model="gemma-3-270m", messages=[{"role": "user", "content": "Who?"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "person", "description": "A person the user asked about.", "schema": PERSON}})
        await client.completions.create(model="gemma-3-270m", prompt="Who?",
                                        extra_body={"response_format": {"type": "json_object"}})
    assert json.loads(reply.choices[0].message.content) == {"name": "Ada", "age": 36}
    chat, plain = mesh.generator.requests
    assert '"\\"name\\"" space ":"' in chat.grammar and "root ::=" in chat.grammar
    assert json.dumps(PERSON, separators=(",", ":")) in chat.prompt, "the model is told the schema too"
    assert "A person the user asked about." in chat.prompt
    assert plain.grammar.startswith("root ::=") and plain.prompt == "Who?"


async def test_text_format_is_free_text(mesh: Mesh):
    async with client_for(mesh) as client:
        await client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "Hi"}],
                                             response_format={"type": "text"})
    assert mesh.generator.requests[0].grammar == ""


@pytest.mark.parametrize(("kwargs", "param"), [
    (dict(response_format=json_schema_format({"type": "object", "properties": {"age": {
        "type": "integer", "minimum": 0}}})), "response_format.json_schema.schema.properties.age.minimum"),
    (dict(response_format=json_schema_format({"type": "string", "format": "email"}, strict=False)),
     "response_format.json_schema.schema.format"),
    (dict(response_format={"type": "yaml"}), "response_format.type"),
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}),
     "response_format.json_schema.name"),
    (dict(tools=[{"type": "function", "function": {
        "name": "f", "strict": True, "parameters": {"type": "object", "properties": {
            "n": {"type": "integer", "multipleOf": 2}}}}}]), "tools[0].function.parameters.properties.n.multipleOf"),
])
async def test_what_the_grammar_cannot_enforce_is_refused_naming_its_path(mesh: Mesh, kwargs, param):
    async with client_for(mesh) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="gemma-3-270m", messages=[{"role": "user", "content": "x"}],
                                                 **kwargs)
    assert caught.value.body["param"] == param, caught.value.body
    assert mesh.generator.requests == []


async def test_a_strict_tool_constrains_auto_calls_and_a_loose_one_only_guides(mesh: Mesh):
    loose = {"type": "function", "function": {"name": "g", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}
    strict = {"type": "function", "function": {**WEATHER_TOOL["function"], "strict": True}}
    async with client_for(mesh) as client:
        for tools in ([loose], [strict]):
            await client.chat.completions.create(model="gemma-3-270m", tools=tools,
                                                 messages=[{"role": "user", "content": "x"}])
    loose_sent, strict_sent = mesh.generator.requests
    assert loose_sent.grammar == "" and '"minimum":1' in loose_sent.prompt
    assert '"\\"get_weather\\""' in strict_sent.grammar and "free-answer" in strict_sent.grammar


@pytest.mark.model
@pytest.mark.slow
# Forty grammar-constrained answers on the CPU: about 250-300 s on a 2-core machine whose CPU's repacked
# weight layouts are off (docs/inference.md, "CPU weight layouts"), longer with the other core busy. The
# guard is for a hang, not for speed.
@pytest.mark.timeout(900)
async def test_twenty_json_schemas_on_the_bundled_model_parse_and_validate(model_path, keys, authenticator):
    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    assert len(SCHEMAS) == 20
    node_settings = InferenceSettings(port=0, model_path=str(model_path), n_ctx=4096, n_seq_max=4, n_gpu_layers=0)
    gate = asyncio.Semaphore(4)
    async with running_service(build_inference(node_settings), node_settings) as node:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",)), authenticator=authenticator)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:

                async def answer(schema: dict, stream: bool) -> tuple[str, str]:
                    kwargs = dict(model="gemma-3-270m", max_tokens=160, temperature=0, seed=1,
                                  response_format=json_schema_format(schema),
                                  messages=[{"role": "user", "content": "Give an example."}])
                    async with gate:
                        if not stream:
                            reply = await client.chat.completions.create(**kwargs)
                            return reply.choices[0].message.content or "", reply.choices[0].finish_reason
                        chunks = [c async for c in await client.chat.completions.create(stream=True, **kwargs)]
                    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
                    return text, [c.choices[0].finish_reason for c in chunks if c.choices][-1]

                cases = [(schema, stream) for schema in SCHEMAS for stream in (False, True)]
                answers = await asyncio.gather(*(answer(schema, stream) for schema, stream in cases))
    for (schema, stream), (text, finish) in zip(cases, answers, strict=True):
        assert finish == "stop", f"stream={stream}: the answer did not end: {text!r} for {schema}"
        jsonschema.validate(json.loads(text), schema)
