"""/v1/responses on the bundled model: a chain reuses its session's KV cache and answers as a cold run does,
and a background response survives its client's disconnect."""
from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import openai
import pytest

from services.common.auth import ApiKeyAuthenticator
from services.common.runtime import running_service
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from services.store.config import Settings as StoreSettings
from services.store.server import build_app as build_store
from tests.gateway.conftest import Keys

pytestmark = [pytest.mark.model, pytest.mark.slow]
TURNS = ["Name a fruit.", "Name another one.", "Which is sweeter?", "Name a vegetable.", "Say goodbye."]
INSTRUCTIONS = "Answer in one short sentence."


@pytest.fixture
async def client(model_path: Path, tmp_path: Path, keys: Keys,
                 authenticator: ApiKeyAuthenticator) -> AsyncIterator[openai.AsyncOpenAI]:
    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    node_settings = InferenceSettings(port=0, model_path=str(model_path), n_ctx=2048, n_seq_max=4, n_gpu_layers=0)
    store_settings = StoreSettings(port=0, data_dir=str(tmp_path / "store"), sqlite_synchronous="NORMAL")
    async with running_service(build_inference(node_settings), node_settings) as node, \
            running_service(build_store(store_settings), store_settings) as store:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",),
                                 store_target=f"127.0.0.1:{store.port}"), authenticator=authenticator)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=keys.acme, max_retries=0) as client:
                yield client


async def test_a_five_turn_chain_reuses_its_cache_and_matches_a_cold_run(client: openai.AsyncOpenAI,
                                                                          keys: Keys):
    previous = None
    history: list[dict] = []
    chain = []
    for text in TURNS:
        response = await client.responses.create(model="gemma-3-270m", instructions=INSTRUCTIONS, input=text,
                                                 previous_response_id=previous, temperature=0, max_output_tokens=24)
        assert response.status in ("completed", "incomplete")
        chain.append(response)
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": response.output_text}]
        previous = response.id
    cached = [r.usage.input_tokens_details.cached_tokens for r in chain]
    assert cached[0] == 0 and all(c > 0 for c in cached[1:]), cached
    # Each follow-up reuses at least everything the turn before it prefilled.
    assert all(chain[i].usage.input_tokens_details.cached_tokens >= chain[i - 1].usage.input_tokens
               for i in range(1, len(chain))), [(r.usage.input_tokens, r.usage.input_tokens_details.cached_tokens)
                                                 for r in chain]
    # Another tenant's request shares no cells with acme's chain (the node keeps tenants apart), so it runs cold.
    async with openai.AsyncOpenAI(base_url=str(client.base_url), api_key=keys.globex, max_retries=0) as other:
        cold = await other.responses.create(model="gemma-3-270m", instructions=INSTRUCTIONS, input=history[:-1],
                                            temperature=0, max_output_tokens=24)
    assert cold.usage.input_tokens_details.cached_tokens == 0
    assert cold.usage.input_tokens == chain[-1].usage.input_tokens
    assert cold.output_text == chain[-1].output_text


async def test_a_background_response_survives_a_disconnect_and_resumes_exactly(client: openai.AsyncOpenAI):
    stream = await client.responses.create(model="gemma-3-270m", input="Count from one to forty in words.",
                                           background=True, stream=True, temperature=0, max_output_tokens=96)
    seen = []
    async for event in stream:
        seen.append(event)
        if event.type == "response.output_text.delta" and len(seen) >= 10:
            break
    await stream.close()
    response_id = seen[0].response.id
    resumed = await client.responses.retrieve(response_id, stream=True, starting_after=seen[-1].sequence_number)
    rest = [event async for event in resumed]
    events = seen + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].type in ("response.completed", "response.incomplete")
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = await client.responses.retrieve(response_id)
    assert final.status == events[-1].response.status and final.output_text == text and text
