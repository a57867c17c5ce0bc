"""Runs end to end over scripted inference, fake tools and the in-memory store."""
from __future__ import annotations

import asyncio

import pytest

from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted, Unavailable
from services.orchestrator.core.ports import ABORT, APPROVE_ONCE, APPROVE_SESSION, DENY, STATUS_DENIED
from tests.orchestrator.builders import collect, make_rig
from tests.orchestrator.fakes import Gate, call


def types(events) -> list[str]:
    return [e.type for e in events]


async def test_parallel_tool_calls_then_final_answer_and_store_matches_live():
    rig = make_rig([call("fs_read", path="notes.txt") + "\n" + call("fs_list", path="."), "All done."])
    session = await rig.session(tools=["fs_read", "fs_list"])
    run, events = await rig.orchestrator.run(request_id="r1", tenant_id="acme", session_id=session.session_id,
                                             user_message="read notes and list files")
    live = await collect(events)
    await run.done.wait()  # the last batch reaches the store as the run closes
    assert types(live) == ["turn_started", "tool_call", "tool_call", "tool_result", "tool_result", "token", "token",
                           "final"]
    assert [e.seq for e in live] == list(range(1, len(live) + 1))
    assert rig.tools.batches == [["fs_read", "fs_list"]]
    assert rig.tools.max_running == 2, "both calls must run at the same time"
    final = live[-1].body
    assert final["text"] == "All done." and final["reason"] == "stop"
    assert final["usage"]["num_model_calls"] == 2 and final["usage"]["num_tool_calls"] == 2
    stored = await rig.store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert [(e.seq, e.type, e.body) for e in stored] == [(e.seq, e.type, e.body) for e in live]
    # The second model call saw both tool results in its prompt, and the grammar allowed only the session's tools.
    assert 'fs_read' in rig.inference.requests[0].grammar and '"shell"' not in rig.inference.requests[0].grammar


async def test_second_run_continues_the_history_and_seq():
    rig = make_rig(["First answer.", "Second answer."])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="one")
    first = await collect(events)
    _r, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                            user_message="two")
    second = await collect(events)
    assert second[0].seq == first[-1].seq + 1
    prompt_text_tokens = rig.inference.requests[1].prompt_tokens
    assert len(prompt_text_tokens) > len(rig.inference.requests[0].prompt_tokens)
    messages = await rig.store.list_messages(tenant_id="acme", session_id=session.session_id, after_position=0)
    assert [(m.role, m.content) for m in messages] == [
        ("user", "one"), ("assistant", "First answer."), ("user", "two"), ("assistant", "Second answer.")]
    assert all(m.num_tokens > 0 for m in messages)


async def test_one_active_run_per_session_and_cancel_by_token():
    gate = Gate("never sent")
    rig = make_rig([gate, "after cancel"])
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="slow")
    await gate.reached.wait()
    with pytest.raises(FailedPrecondition) as busy:
        await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                   user_message="again")
    assert busy.value.reason == "SESSION_BUSY"
    assert await rig.orchestrator.cancel("acme", session.session_id)
    live = await collect(events)
    assert live[-1].type == "final" and live[-1].body["reason"] == "cancelled"
    # The session is usable again at once.
    _r, events = await rig.orchestrator.run(request_id="c", tenant_id="acme", session_id=session.session_id,
                                            user_message="next")
    assert (await collect(events))[-1].body["text"] == "after cancel"


async def test_disconnected_client_does_not_stop_the_run():
    gate = Gate("finished anyway")
    rig = make_rig([gate])
    session = await rig.session()
    run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                             user_message="go")
    first = await events.__anext__()
    await events.aclose()  # the client went away
    gate.release.set()
    await asyncio.wait_for(run.done.wait(), 5)
    stored = await rig.store.read_events(tenant_id="acme", session_id=session.session_id, after_seq=0)
    assert first.type == "turn_started" and stored[-1].body["text"] == "finished anyway"


async def test_transient_inference_failure_is_retried_before_first_token():
    rig = make_rig([Unavailable("node down"), Unavailable("node down"), "recovered"])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="hi")
    assert (await collect(events))[-1].body["text"] == "recovered"
    assert len(rig.inference.requests) == 3


async def test_failed_turn_is_an_error_event_and_the_session_stays_usable():
    rig = make_rig([Unavailable("down")] * 3 + ["fine now"])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="hi")
    failed = await collect(events)
    assert failed[-1].type == "error" and failed[-1].body["reason"] == "UNAVAILABLE"
    assert failed[-1].body["retryable"] is True
    _r, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                            user_message="again")
    assert (await collect(events))[-1].body["text"] == "fine now"


async def test_retryable_tool_timeout_is_retried_and_tools_outage_too():
    rig = make_rig([call("fs_read", path="a"), "ok"])
    rig.tools.timeouts_left["fs_read"] = 1
    rig.tools.unavailable_left = 1
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="hi")
    live = await collect(events)
    result = next(e for e in live if e.type == "tool_result")
    assert result.body["status"] == "TOOL_STATUS_OK"
    assert len(rig.tools.executed) == 1


async def test_a_call_that_did_not_start_for_want_of_policy_is_retried_even_if_not_retryable():
    rig = make_rig([call("shell", command="ls"), "ok"])
    rig.tools.policy_down_left["shell"] = 1
    rig.tools.timeouts_left["shell"] = 1  # it started and timed out: not retried, shell is not retryable
    session = await rig.session(tools=["shell"])
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="hi")
    seen = []
    async for event in events:
        seen.append(event)
        if event.type == "approval_required":
            await rig.orchestrator.submit_approval(request_id="ap", tenant_id="acme", session_id=session.session_id,
                                                   approval_id=event.body["approval_id"], decision=APPROVE_ONCE,
                                                   approver="ops")
    results = [e.body for e in seen if e.type == "tool_result"]
    assert [(r["status"], r["output"]) for r in results] == [("TOOL_STATUS_TIMEOUT", "timed out")]
    assert "approval_required" in types(seen), "the retry reached policy and asked a person"
    assert rig.tools.policy_down_left["shell"] == 0 and rig.tools.timeouts_left["shell"] == 0


async def test_truncated_tool_call_is_an_error_naming_the_reason():
    rig = make_rig(['<tool_call>{"name": "fs_read", "argu'])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="hi")
    live = await collect(events)
    assert live[-1].type == "error" and live[-1].body["reason"] == "MALFORMED_TOOL_CALL"
    assert "token" not in types(live), "a tool-call reply is not streamed as answer text"


async def test_bad_input_names_the_field():
    rig = make_rig()
    session = await rig.session()
    with pytest.raises(InvalidArgument) as err:
        await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                   user_message="  ")
    assert err.value.field == "user_message"
    with pytest.raises(InvalidArgument) as err:
        await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                   user_message="x", max_steps=999)
    assert err.value.field == "options.max_steps"


async def test_tenant_rate_limit_pushes_back_with_a_delay():
    rig = make_rig(["a", "b"], tenant_runs_per_s=0.5, tenant_burst=1)
    s1, s2 = await rig.session(), await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=s1.session_id,
                                            user_message="hi")
    await collect(events)
    with pytest.raises(ResourceExhausted) as err:
        await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=s2.session_id, user_message="hi")
    assert err.value.reason == "TENANT_RATE_LIMITED" and 1000 <= err.value.retry_after_ms <= 2000


async def test_risky_call_waits_for_approval_and_session_approval_sticks():
    command = call("shell", command="rm -rf build")
    rig = make_rig([command, "removed", command, "removed again"])
    session = await rig.session()
    orch = rig.orchestrator
    _r, events = await orch.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                user_message="clean")
    seen = []
    async for event in events:
        seen.append(event)
        if event.type == "approval_required":
            assert not rig.tools.executed, "the call must not run before approval"
            await orch.submit_approval(request_id="x", tenant_id="acme", session_id=session.session_id,
                                       approval_id=event.body["approval_id"], decision=APPROVE_SESSION,
                                       approver="ops")
    assert types(seen) == ["turn_started", "tool_call", "approval_required", "tool_result", "token", "final"]
    assert [c.name for c in rig.tools.executed] == ["shell"]
    _r, events = await orch.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                user_message="clean again")
    second = await collect(events)
    assert "approval_required" not in types(second)
    assert len(rig.tools.executed) == 2 and rig.policy.recorded == [("ap-1", APPROVE_SESSION)]


async def test_identical_calls_in_one_reply_ask_once_and_the_session_approval_covers_later_runs():
    # A base model often repeats a call within one reply; policy gives the copies one approval id.
    command = call("shell", command="rm -rf build")
    rig = make_rig(["\n".join([command] * 3), "removed", command, "removed again"])
    session = await rig.session()
    orch = rig.orchestrator
    asked = []
    for message in ("clean", "clean again"):
        _r, events = await orch.run(request_id=message, tenant_id="acme", session_id=session.session_id,
                                    user_message=message)
        async for event in events:
            if event.type == "approval_required":
                asked.append(event.body["approval_id"])
                await orch.submit_approval(request_id=message, tenant_id="acme", session_id=session.session_id,
                                           approval_id=event.body["approval_id"], decision=APPROVE_SESSION,
                                           approver="ops")
    assert asked == ["ap-1"], "the person was asked more than once for one call"
    assert [c.name for c in rig.tools.executed] == ["shell"] * 4
    assert rig.policy.recorded == [("ap-1", APPROVE_SESSION)]


@pytest.mark.parametrize("decision", [DENY, ABORT])
async def test_denied_or_aborted_approval(decision):
    rig = make_rig([call("shell", command="reboot"), "gave up"])
    session = await rig.session()
    orch = rig.orchestrator
    _r, events = await orch.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                user_message="reboot")
    seen = []
    async for event in events:
        seen.append(event)
        if event.type == "approval_required":
            await orch.submit_approval(request_id="x", tenant_id="acme", session_id=session.session_id,
                                       approval_id=event.body["approval_id"], decision=decision, approver="ops")
    assert not rig.tools.executed
    if decision == DENY:
        result = next(e for e in seen if e.type == "tool_result")
        assert result.body["status"] == STATUS_DENIED and seen[-1].body["text"] == "gave up"
    else:
        assert seen[-1].type == "final" and seen[-1].body["reason"] == "aborted"


async def test_resume_after_any_seq_returns_the_rest_once():
    rig = make_rig([call("fs_read", path="a"), "one two three four five six"])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="go")
    live = await collect(events)
    for after in range(0, len(live)):
        resumed = []
        async for event in await rig.orchestrator.resume("acme", session.session_id, after):
            resumed.append(event)
            if event.is_terminal:
                break
        assert [e.seq for e in resumed] == [e.seq for e in live[after:]]


async def test_tool_choice_required_then_last_step_answers_without_tools():
    rig = make_rig([call("fs_list", path="."), "plain answer"])
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message="go", max_steps=2, tool_choice="required")
    live = await collect(events)
    first, last = rig.inference.requests
    assert first.grammar.startswith("root ::= calls\n"), "step one must call a tool"
    assert last.grammar == "", "the last step answers as free text"
    assert live[-1].body == {"text": "plain answer", "reason": "stop", "usage": live[-1].body["usage"]}
