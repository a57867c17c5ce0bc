"""The agent loop on the real bundled model (llama.cpp in process), grammar-constrained.

The inference, tools and store services are other components; here the model
runs through the in-process llama.cpp adapter, tools are the scripted fakes
and the store is the in-memory one, so what is checked is the orchestrator's
mechanics on real sampled text: what was called, in what order, what was stored.
"""
from __future__ import annotations

import pytest

from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import collect, make_rig
from tests.orchestrator.fakes import FS_LIST, FS_READ, FakeTools

pytestmark = [pytest.mark.model, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_model(model_path):
    from services.orchestrator.adapters.local_llama import LocalLlamaInference

    inference = LocalLlamaInference(model_path, n_ctx=2048)
    yield inference
    inference.close()


async def test_model_calls_fs_read_and_fs_list_in_one_turn_then_answers(local_model):
    tools = FakeTools([FS_READ, FS_LIST], delay_s=0.2)
    rig = make_rig(inference=local_model, tools=tools, limits=RunLimits(default_max_tokens=120))
    session = await rig.session(tools=["fs_read", "fs_list"], system_prompt="You are a file assistant.")
    run, events = await rig.orchestrator.run(
        request_id="r", tenant_id="acme", session_id=session.session_id,
        user_message="Read notes.txt and list the files here.", max_steps=2, tool_choice="required", seed=7)
    live = await collect(events)
    await run.done.wait()
    kinds = [e.type for e in live]
    called = [e.body["name"] for e in live if e.type == "tool_call"]
    assert {"fs_read", "fs_list"} <= set(called), called
    # All calls of the turn went out as one batch and ran side by side.
    assert tools.batches == [called] and tools.max_running >= 2
    assert kinds[-1] == "final" and live[-1].body["reason"] == "stop" and live[-1].body["text"]
    assert kinds.index("final") > max(i for i, k in enumerate(kinds) if k == "tool_result")
    usage = live[-1].body["usage"]
    assert usage["num_model_calls"] == 2 and usage["num_tool_calls"] == len(called) and usage["prompt_tokens"] > 0
    stored = await rig.store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [(e.seq, e.type, e.body) for e in stored] == [(e.seq, e.type, e.body) for e in live]
