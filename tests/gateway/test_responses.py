"""/v1/responses over a real store service and a scripted generator, driven by the official ``openai`` package."""
from __future__ import annotations

import asyncio
import json

import openai
import pytest

from tests.gateway.conftest import ResponsesMesh
from tests.gateway.fakes import ScriptedGenerator

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}


async def test_a_chain_continues_its_session_and_renders_the_whole_history(rmesh: ResponsesMesh):
    async with rmesh.client() as client:
        first = await client.responses.create(model="gemma-3-270m", input="Say hi", instructions="Be brief.",
                                              temperature=0)
        assert first.status == "completed" and first.output_text == "Hello from llmesh"
        assert first.usage.output_tokens == 3 and first.store is not False
        second = await client.responses.create(model="gemma-3-270m", input="Again", instructions="Be brief.",
                                               previous_response_id=first.id, temperature=0)
        assert second.previous_response_id == first.id
    first_req, second_req = rmesh.generator.requests
    # One chain, one node session: the follow-up's prompt extends the first turn's prompt and answer.
    assert first_req.session_id and first_req.session_id == second_req.session_id
    assert second_req.prompt.startswith(first_req.prompt + "Hello from llmesh")
    assert second_req.prompt.endswith("Again<end_of_turn>\n<start_of_turn>model\n")
    assert {r.tenant_id for r in rmesh.generator.requests} == {"acme"}


async def test_retrieve_input_items_and_delete(rmesh: ResponsesMesh):
    async with rmesh.client() as client:
        created = await client.responses.create(
            input=[{"role": "user", "content": "one"}, {"role": "user", "content": [{"type": "input_text",
                                                                                    "text": "two"}]}])
        got = await client.responses.retrieve(created.id)
        assert got.id == created.id and got.output_text == "Hello from llmesh" and got.status == "completed"
        items = await client.responses.input_items.list(created.id, order="asc")
        assert [i.content[0].text for i in items.data] == ["one", "two"]
        assert [i.content[0].text for i in (await client.responses.input_items.list(created.id)).data] == \
            ["two", "one"]
        deleted = await client.responses.delete(created.id)
        assert deleted is None or getattr(deleted, "deleted", True)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(input="more", previous_response_id=created.id)


async def test_another_tenant_cannot_see_or_continue_a_response(rmesh: ResponsesMesh):
    async with rmesh.client() as acme, rmesh.client(rmesh.keys.globex) as globex:
        created = await acme.responses.create(input="secret")
        with pytest.raises(openai.NotFoundError):
            await globex.responses.retrieve(created.id)
        with pytest.raises(openai.NotFoundError):
            await globex.responses.create(input="more", previous_response_id=created.id)
        with pytest.raises(openai.NotFoundError):
            await globex.responses.delete(created.id)


async def test_streaming_events_are_numbered_and_end_completed(rmesh: ResponsesMesh):
    async with rmesh.client() as client:
        stream = await client.responses.create(input="Say hi", stream=True)
        events = [event async for event in stream]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Hello from llmesh"
    assert events[-1].response.output_text == "Hello from llmesh"


@pytest.mark.parametrize("stream", [False, True])
async def test_a_function_call_and_its_output_round_trip(rmesh: ResponsesMesh, stream: bool):
    rmesh.generator.text = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
    async with rmesh.client() as client:
        kwargs = dict(input="Weather in Paris?", tools=[WEATHER], tool_choice="required")
        if stream:
            events = [e async for e in await client.responses.create(stream=True, **kwargs)]
            assert not [e for e in events if e.type == "response.output_text.delta"]
            response = events[-1].response
        else:
            response = await client.responses.create(**kwargs)
        call = response.output[0]
        assert call.type == "function_call" and call.name == "get_weather"
        assert json.loads(call.arguments) == {"city": "Paris"}
        rmesh.generator.text = "Sunny"
        answer = await client.responses.create(
            previous_response_id=response.id, tools=[WEATHER],
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21C"}])
    assert answer.output_text == "Sunny"
    assert rmesh.generator.requests[0].grammar
    assert "Result of get_weather:\nsunny, 21C" in rmesh.generator.requests[-1].prompt


async def test_a_follow_up_of_an_older_response_forks_a_new_chain(rmesh: ResponsesMesh):
    async with rmesh.client() as client:
        first = await client.responses.create(input="one")
        await client.responses.create(input="two", previous_response_id=first.id)
        fork = await client.responses.create(input="other", previous_response_id=first.id)
        assert fork.previous_response_id == first.id
        follow = await client.responses.create(input="more", previous_response_id=fork.id)
    one, two, other, more = rmesh.generator.requests
    assert one.session_id == two.session_id and other.session_id != one.session_id
    assert more.session_id == other.session_id
    assert "two" not in other.prompt and other.prompt.startswith(one.prompt + "Hello from llmesh")
    assert follow.status == "completed"


async def test_store_false_is_not_kept(rmesh: ResponsesMesh):
    async with rmesh.client() as client:
        created = await client.responses.create(input="hi", store=False)
        assert created.status == "completed"
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(created.id)
    assert rmesh.generator.requests[0].session_id == ""


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "reasoning": {"effort": "high"}}, "reasoning"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": [{"type": "input_image"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].image_url"),
    ({"input": "x", "background": True, "store": False}, "background"),
    ({"input": "x", "tools": [{**WEATHER, "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "not": {}}}}}]}, "tools[0].parameters.properties.city.not"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a b", "schema": {}}}}, "text.format.name"),
    ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
    ({"input": "x", "surprise": 1}, "surprise"),
])
async def test_refusals_name_the_field(rmesh: ResponsesMesh, body: dict, param: str):
    async with rmesh.http() as http:
        reply = await http.post("/v1/responses", json=body)
    assert reply.status_code in (400, 404), reply.text
    assert reply.json()["error"]["param"] == param, reply.text


async def test_json_schema_text_format_constrains_the_answer(rmesh: ResponsesMesh):
    rmesh.generator.text = '{"city": "Paris"}'
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    async with rmesh.client() as client:
        reply = await client.responses.create(input="Where?", text={"format": {
            "type": "json_schema", "name": "place", "schema": schema, "strict": True}})
    assert json.loads(reply.output_text) == {"city": "Paris"}
    assert rmesh.generator.requests[0].grammar


class SlowGenerator(ScriptedGenerator):
    """Words one at a time, a pause between them, so a background response can be left and cancelled."""

    def __init__(self, words: int = 40, pause_s: float = 0.05) -> None:
        super().__init__(" ".join(f"w{i}" for i in range(words)))
        self.pause_s = pause_s

    async def generate(self, params):  # type: ignore[override]
        async for chunk in super().generate(params):
            await asyncio.sleep(self.pause_s)
            yield chunk


async def test_background_stream_resumes_after_a_disconnect_with_nothing_missing_or_repeated(rmesh: ResponsesMesh):
    rmesh.generator.__class__ = SlowGenerator
    rmesh.generator.pause_s = 0.03  # type: ignore[attr-defined]
    rmesh.generator.text = " ".join(f"w{i}" for i in range(40))
    async with rmesh.client() as client:
        stream = await client.responses.create(input="count", background=True, stream=True)
        seen = []
        async for event in stream:
            seen.append(event)
            if len(seen) == 8:
                break
        await stream.close()
        resumed = await client.responses.retrieve(seen[0].response.id, stream=True,
                                                  starting_after=seen[-1].sequence_number)
        rest = [event async for event in resumed]
    numbers = [e.sequence_number for e in seen + rest]
    assert numbers == list(range(len(numbers)))
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in seen + rest if e.type == "response.output_text.delta")
    assert text == rmesh.generator.text


async def test_background_response_runs_on_and_can_be_cancelled(rmesh: ResponsesMesh):
    rmesh.generator.__class__ = SlowGenerator
    rmesh.generator.pause_s = 0.05  # type: ignore[attr-defined]
    rmesh.generator.text = " ".join(f"w{i}" for i in range(200))
    async with rmesh.client() as client:
        created = await client.responses.create(input="count", background=True)
        assert created.status in ("queued", "in_progress") and created.background
        await asyncio.sleep(0.3)
        cancelled = await client.responses.cancel(created.id)
        assert cancelled.status == "cancelled"
        again = await client.responses.retrieve(created.id)
        assert again.status == "cancelled"
        replay = [e async for e in await client.responses.retrieve(created.id, stream=True)]
    assert replay[-1].type == "response.cancelled"
    assert [e.sequence_number for e in replay] == list(range(len(replay)))


async def test_two_follow_ups_of_one_response_at_once_both_complete_one_in_a_fork(rmesh: ResponsesMesh):
    rmesh.generator.__class__ = SlowGenerator
    rmesh.generator.pause_s = 0.02  # type: ignore[attr-defined]
    async with rmesh.client() as client:
        first = await client.responses.create(input="one")
        a, b = await asyncio.gather(*(client.responses.create(input=text, previous_response_id=first.id)
                                      for text in ("left", "right")))
        assert a.status == b.status == "completed"
        items_a = await client.responses.input_items.list(a.id)
        items_b = await client.responses.input_items.list(b.id)
    assert [i.content[0].text for i in items_a.data] == ["left"]
    assert [i.content[0].text for i in items_b.data] == ["right"]
    sessions = {r.session_id for r in rmesh.generator.requests[1:]}
    assert len(sessions) == 2 and rmesh.generator.requests[0].session_id in sessions
    for request in rmesh.generator.requests[1:]:
        assert ("left" in request.prompt) != ("right" in request.prompt)


async def test_a_response_whose_runner_is_gone_ends_failed_when_read(rmesh: ResponsesMesh, monkeypatch):
    from services.gateway.core import openai_responses

    async def vanish(self) -> None:  # the replica dies: nothing is recorded, the lock is not given back
        self.queue.put_nowait(None)

    monkeypatch.setattr(openai_responses, "LOCK_LEASE_MS", 300)
    monkeypatch.setattr(openai_responses._Runner, "_finish", vanish)
    rmesh.generator.__class__ = SlowGenerator
    rmesh.generator.pause_s = 0.05  # type: ignore[attr-defined]
    rmesh.generator.text = " ".join(f"w{i}" for i in range(400))
    async with rmesh.client() as client:
        created = await client.responses.create(input="count", background=True)
        await asyncio.sleep(0.3)
        assert (await client.responses.retrieve(created.id)).status == "in_progress", "its runner holds the chain"
        for task in list(rmesh.responses._background):
            task.cancel()
        await asyncio.sleep(0.5)  # the lease runs out
        stream = await client.responses.retrieve(created.id, stream=True)
        events = [event async for event in stream]
        again = await client.responses.retrieve(created.id)
    assert events[-1].type == "response.failed" and again.status == "failed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
