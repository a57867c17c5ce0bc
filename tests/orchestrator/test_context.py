"""ContextManager: real counts, compaction and each of its fallbacks."""
from __future__ import annotations

import pytest

from services.common.errors import Unavailable
from services.orchestrator.core.context import ContextManager, ContextOverflow
from services.orchestrator.core.history import ASSISTANT, SUMMARY, TOOL_OUTPUT, USER, CallRef, HistoryItem, system_item
from services.orchestrator.core.prompt import PromptPipeline
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import collect, make_rig
from tests.orchestrator.fakes import ScriptedInference, call, fake_tokenize


class ListLog:
    def __init__(self) -> None:
        self.records = []

    async def append(self, records):
        start = len(self.records)
        for i, r in enumerate(records):
            self.records.append(r.__class__(**{**r.__dict__, "position": start + i + 1}))
        return [start + i + 1 for i in range(len(records))]


def words(n: int, tag: str = "w") -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


async def make_context(n_ctx: int, summarizer=None, fraction: float = 0.8):
    inference = ScriptedInference(n_ctx=n_ctx)
    pipeline = PromptPipeline(inference)
    log = ListLog()
    context = ContextManager(pipeline, n_ctx=n_ctx, fraction=fraction, system=system_item("sys", ""),
                             summarizer=summarizer, message_log=log)
    return context, inference, log


async def fill(context, num_exchanges: int, size: int) -> None:
    for i in range(num_exchanges):
        await context.add(HistoryItem(kind=USER, text=words(size, f"u{i}-")))
        await context.add(HistoryItem(kind=ASSISTANT, calls=(CallRef(f"c{i}", "fs_read", {"path": f"f{i}"}),)))
        await context.add(HistoryItem(kind=TOOL_OUTPUT, text=words(size, f"o{i}-"), call_id=f"c{i}", name="fs_read",
                                      status="TOOL_STATUS_OK"))


async def test_counts_are_the_tokenizers_and_the_prefix_is_tokenized_once():
    context, inference, _log = await make_context(4096)
    await fill(context, 2, 10)
    item = context.items[0]
    assert item.num_tokens == len(fake_tokenize(item.render()))
    first = await context.prepare(64)
    tokenized_before = len(inference.tokenized)
    await context.add(HistoryItem(kind=USER, text="one more"))
    second = await context.prepare(64)
    # Only the new item went to the tokenizer; the rest of the prompt came from the cache.
    assert inference.tokenized[tokenized_before:] == [context.items[-1].render()]
    assert second.prompt.tokens[: len(first.prompt.tokens) - 3] == first.prompt.tokens[:-3]
    assert first.compactions == ()


async def test_summarize_when_the_prompt_passes_the_fraction():
    async def summarizer(items):
        return "they read files " + str(len(items))

    context, _inf, log = await make_context(400, summarizer)
    await fill(context, 6, 12)
    await context.add(HistoryItem(kind=USER, text="latest question"))
    prepared = await context.prepare(32)
    (report,) = prepared.compactions
    assert report.strategy == "summarize" and report.tokens_before > 320 >= report.tokens_after
    assert prepared.prompt.num_tokens <= 320
    assert [i.kind for i in context.items] == [SUMMARY, USER]
    assert context.items[0].text == "they read files 18"
    # A restored session sees the compacted history.
    restored, _i, _l = await make_context(400)
    restored.restore(log.records)
    assert [(i.kind, i.text) for i in restored.items] == [(i.kind, i.text) for i in context.items]


async def test_drop_oldest_when_summary_fails():
    async def broken(items):
        raise Unavailable("model down")

    context, _inf, log = await make_context(400, broken)
    await fill(context, 6, 12)
    await context.add(HistoryItem(kind=USER, text="latest question"))
    prepared = await context.prepare(32)
    (report,) = prepared.compactions
    assert report.strategy == "drop_oldest" and report.tokens_after <= 320
    kinds = [i.kind for i in context.items]
    assert kinds[-1] == USER and kinds.count(ASSISTANT) == kinds.count(TOOL_OUTPUT), "calls keep their outputs"
    assert context.items[0].kind == USER
    restored, _i, _l = await make_context(400)
    restored.restore(log.records)
    assert [i.text for i in restored.items] == [i.text for i in context.items]


async def test_minimal_when_the_current_exchange_alone_is_too_big():
    context, _inf, _log = await make_context(400)
    await fill(context, 1, 10)
    await context.add(HistoryItem(kind=USER, text="the question"))
    await context.add(HistoryItem(kind=ASSISTANT, calls=(CallRef("big", "fs_read", {"path": "huge"}),)))
    await context.add(HistoryItem(kind=TOOL_OUTPUT, text=words(400), call_id="big", name="fs_read"))
    prepared = await context.prepare(32)
    assert [r.strategy for r in prepared.compactions] == ["minimal"]
    assert [(i.kind, i.text) for i in context.items] == [(USER, "the question")]


async def test_minimal_context_that_still_overflows_raises():
    context, _inf, _log = await make_context(300)
    await context.add(HistoryItem(kind=USER, text=words(400)))
    with pytest.raises(ContextOverflow) as err:
        await context.prepare(16)
    assert err.value.reason == "CONTEXT_OVERFLOW"


async def test_overflowing_prompt_is_never_sent():
    rig = make_rig([], n_ctx=300)
    session = await rig.session()
    _run, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                              user_message=words(400))
    live = await collect(events)
    assert live[-1].type == "error" and live[-1].body["reason"] == "CONTEXT_OVERFLOW"
    assert rig.inference.requests == []


async def test_run_compacts_with_the_model_and_goes_on():
    big = "x " * 150
    rig = make_rig([call("fs_read", path="a"), "answer one", "a short summary", "answer two"], n_ctx=600,
                   limits=RunLimits(default_max_tokens=32))
    rig.tools.handlers["fs_read"] = lambda args: _const(big)
    session = await rig.session()
    _r, events = await rig.orchestrator.run(request_id="a", tenant_id="acme", session_id=session.session_id,
                                            user_message=words(100))
    await collect(events)
    _r, events = await rig.orchestrator.run(request_id="b", tenant_id="acme", session_id=session.session_id,
                                            user_message=words(100, "q"))
    live = await collect(events)
    compaction = next(e for e in live if e.type == "compaction")
    assert compaction.body["strategy"] == "summarize"
    assert compaction.body["tokens_before"] > 480 >= compaction.body["tokens_after"]
    assert live[-1].body["text"] == "answer two"
    # The summary call went to the model without the tool grammar.
    assert "tool_call" not in rig.inference.requests[2].grammar


async def _const(text):
    return text


def test_fraction_must_be_sane():
    with pytest.raises(ValueError):
        ContextManager(PromptPipeline(ScriptedInference()), n_ctx=100, system=system_item("", ""), fraction=0)

