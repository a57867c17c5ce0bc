"""The engine on the real model: batching, session reuse, eviction, cancel, grammar.

Greedy decoding throughout. llama.cpp on CPU is batch-invariant for these
prompts: the row of one sequence is computed the same way whatever else is in
the batch, as long as the batch shape stays in the same kernel regime; we
check exactly that with short prompts and a few tokens.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.core.engine import Engine, EngineConfig
from services.inference.core.types import FinishReason, GenerateSpec, SamplingParams
from tests.support.waiting import wait_until

pytestmark = pytest.mark.model

NUM_SEQ = 3


@pytest.fixture(scope="module")
def engine(model_path):
    backend = LlamaBackend(model_path, n_ctx=1024, n_seq_max=NUM_SEQ, n_batch=256, n_threads=2)
    engine = Engine(backend, EngineConfig(max_queue=8))
    engine.start()
    yield engine
    engine.stop()
    backend.close()


@pytest.fixture
def fresh_engines(model_path):
    """Engines with empty caches, so nothing is served from an earlier request."""
    made: list[Engine] = []

    def make() -> Engine:
        backend = LlamaBackend(model_path, n_ctx=512, n_seq_max=NUM_SEQ, n_batch=256, n_threads=2)
        fresh = Engine(backend)
        fresh.start()
        made.append(fresh)
        return fresh

    yield make
    for fresh in made:
        fresh.stop()
        fresh.backend.close()


def greedy(prompt: str, max_tokens: int = 8, session: str = "", tenant: str = "", **kw) -> GenerateSpec:
    return GenerateSpec(prompt=prompt, session_id=session, tenant_id=tenant,
                        sampling=SamplingParams(max_tokens=max_tokens, **kw))


async def run(engine: Engine, spec: GenerateSpec) -> tuple[str, list[int], object]:
    text, tokens, last = "", [], None
    async for delta in engine.submit(spec):
        text += delta.text
        tokens.extend(delta.token_ids)
        last = delta
    return text, tokens, last


async def release_all(engine: Engine, *sessions: str) -> None:
    for session in sessions:
        await engine.release_session(session)


PROMPTS = ["The capital of France is", "def fibonacci(n):", "1, 2, 3, 4, 5, 6,"]


async def test_prompt_in_a_batch_yields_the_same_tokens_as_alone(fresh_engines):
    # These prompts have confident continuations; a near-tie (e.g. "Once upon a
    # time, there was") can flip under llama.cpp's batch-size dependent kernels.
    alone_engine = fresh_engines()
    alone = [await run(alone_engine, greedy(p)) for p in PROMPTS]
    batch_engine = fresh_engines()
    together = await asyncio.gather(*(run(batch_engine, greedy(p)) for p in PROMPTS))
    for (text_a, tokens_a, last_a), (text_b, tokens_b, last_b) in zip(alone, together, strict=True):
        assert last_a.usage.cached_tokens == 0 and last_b.usage.cached_tokens == 0
        assert tokens_a == tokens_b
        assert text_a == text_b
        assert len(tokens_a) == 8


async def test_follow_up_turn_reuses_the_cache_and_matches_a_cold_run(engine):
    first_prompt = "Question: what is two plus two?\nAnswer:"
    first_text, _, _ = await run(engine, greedy(first_prompt, session="follow-up"))
    follow_up = first_prompt + first_text + "\nQuestion: and three plus three?\nAnswer:"
    warm_text, warm_tokens, warm = await run(engine, greedy(follow_up, session="follow-up"))
    # Another tenant's session shares nothing, so this one really starts cold.
    cold_text, cold_tokens, cold = await run(engine, greedy(follow_up, session="cold", tenant="elsewhere"))
    await release_all(engine, "follow-up", "cold")
    assert warm.usage.cached_tokens > 10
    assert cold.usage.cached_tokens < warm.usage.cached_tokens
    assert warm_tokens == cold_tokens and warm_text == cold_text


async def test_evicted_session_is_restored_from_saved_state(engine):
    prompt = "Notes from the meeting about the garden:"
    text, _, _ = await run(engine, greedy(prompt, session="evicted"))
    for i in range(NUM_SEQ):  # every sequence taken by another session
        await run(engine, greedy(f"Other session number {i} says", max_tokens=2, session=f"other-{i}"))
    assert "evicted" in engine.scheduler.table.saved
    follow_up = prompt + text + " Next,"
    restored_text, restored_tokens, restored = await run(engine, greedy(follow_up, session="evicted"))
    _, cold_tokens, _ = await run(engine, greedy(follow_up, tenant="elsewhere"))
    await release_all(engine, "evicted", *(f"other-{i}" for i in range(NUM_SEQ)))
    assert restored.usage.cached_tokens >= len(engine.backend.tokenize(prompt, True, True))
    assert restored_tokens == cold_tokens


SYSTEM = ("You are the assistant of a hardware store. Answer in one short sentence, politely, "
          "and name the aisle when you know it. ") * 3


def shared_prefix(engine: Engine, *prompts: str) -> int:
    token_lists = [engine.backend.tokenize(p, True, True) for p in prompts]
    n = 0
    while all(len(t) > n for t in token_lists) and len({t[n] for t in token_lists}) == 1:
        n += 1
    return n


async def test_a_new_session_shares_another_sessions_prefix_and_decodes_like_a_cold_run(fresh_engines):
    warm_engine, cold_engine = fresh_engines(), fresh_engines()
    first = SYSTEM + "Question: where are the hammers?\nAnswer:"
    second = SYSTEM + "Question: do you sell blue paint?\nAnswer:"
    await run(warm_engine, greedy(first, session="a"))
    _, tokens, last = await run(warm_engine, greedy(second, session="b"))
    _, cold_tokens, cold = await run(cold_engine, greedy(second, session="b"))
    shared = shared_prefix(warm_engine, first, second)
    assert shared > 50
    assert last.usage.cached_tokens >= shared and cold.usage.cached_tokens == 0
    assert tokens == cold_tokens
    assert warm_engine.load().kv_cells_saved >= shared


async def test_evicting_one_of_two_sessions_sharing_a_prefix_leaves_the_other_intact(fresh_engines):
    engine, cold_engine = fresh_engines(), fresh_engines()
    prompts = {s: SYSTEM + f"Question: what does {s} cost?\nAnswer:" for s in ("glue", "nails")}
    texts = {s: (await run(engine, greedy(p, session=s)))[0] for s, p in prompts.items()}
    await run(engine, greedy("An unrelated third conversation begins", max_tokens=2, session="third"))
    await run(engine, greedy("A fourth one takes the last sequence", max_tokens=2, session="fourth"))
    table = engine.scheduler.table
    assert "glue" in table.saved and table.resident("nails") is not None
    for session in ("nails", "glue"):  # the survivor of the shared cells, then the restored one
        follow_up = prompts[session] + texts[session] + "\nQuestion: and how much for ten?\nAnswer:"
        _, tokens, last = await run(engine, greedy(follow_up, session=session))
        _, cold_tokens, _ = await run(cold_engine, greedy(follow_up, tenant="cold"))
        assert last.usage.cached_tokens > len(engine.backend.tokenize(prompts[session], True, True))
        assert tokens == cold_tokens


async def test_cancelling_a_stream_frees_its_sequence(engine):
    handle = engine.submit(greedy("Count from one to a thousand: one, two,", max_tokens=500))
    first = await handle.__anext__()
    assert first.token_ids
    await handle.__anext__()  # the load snapshot follows each step; one more token and it shows us
    assert engine.load().num_running == 1
    handle.cancel()
    # The engine frees the sequence at its next step; the bound only guards against a hang.
    assert await wait_until(lambda: engine.load().num_running == 0, timeout_s=30)
    load = engine.load()
    assert load.num_running == 0 and load.num_free_sequences == NUM_SEQ


async def test_grammar_constrains_output_to_a_json_tool_call(engine):
    grammar = r'''
root ::= "{\"tool\": \"" name "\", \"args\": {\"path\": \"" word "\"}}"
name ::= "read_file" | "list_dir"
word ::= [a-z]{1,8}
'''
    text, _, last = await run(engine, greedy("Call a tool:", max_tokens=40, grammar=grammar))
    assert last.finish_reason is FinishReason.STOP
    call = json.loads(text)
    assert call["tool"] in ("read_file", "list_dir")
    assert call["args"]["path"].isalpha()


@pytest.mark.parametrize("sampling", [dict(), dict(temperature=0.9, top_k=40, top_p=0.95, seed=7, repeat_penalty=1.1)])
async def test_a_grammar_the_model_would_not_follow_still_holds(engine, sampling):
    # The model's own pick is never "zq": each step's pick is refused and all candidates constrained.
    grammar = 'root ::= "zq" [0-9] "zq"\n'
    text, tokens, last = await run(engine, greedy("The capital of France is", max_tokens=12, grammar=grammar,
                                                  **sampling))
    assert last.finish_reason is FinishReason.STOP
    assert len(text) == 5 and text.startswith("zq") and text[2].isdigit() and text.endswith("zq"), text


async def test_choices_forked_from_one_prefill_decode_like_a_request_of_their_own(engine):
    prompt = "The three primary colours are red, yellow and"
    alone = await run(engine, greedy(prompt, max_tokens=6))
    deltas = [d async for d in engine.submit(dataclasses.replace(greedy(prompt, max_tokens=6), n=3))]
    choices = {i: [d for d in deltas if d.index == i] for i in range(3)}
    for index, choice in choices.items():
        assert [t for d in choice for t in d.token_ids] == alone[1], f"choice {index} decodes as one request alone"
        assert choice[-1].finish_reason is not None
    usages = [choice[-1].usage for choice in choices.values()]
    assert [u.cached_tokens for u in usages[1:]] == [usages[0].prompt_tokens - 1] * 2, "one prefill, two forks"
    sampled = [d async for d in engine.submit(dataclasses.replace(
        greedy(prompt, max_tokens=8, temperature=1.0, seed=11), n=3))]
    texts = {i: "".join(d.text for d in sampled if d.index == i) for i in range(3)}
    assert len(set(texts.values())) > 1, f"seeds 11, 12 and 13 all sampled {texts}"


async def test_sampling_with_a_seed_is_reproducible(engine):
    spec = greedy("The weather today", max_tokens=10, temperature=0.9, top_k=40, top_p=0.95, min_p=0.05,
                  repeat_penalty=1.1, seed=1234)
    first = await run(engine, spec)
    second = await run(engine, spec)
    assert first[1] == second[1]


def test_plain_greedy_argmax_picks_what_llamas_greedy_sampler_picks(model_path):
    """The backend's argmax shortcut for plain greedy keys equals llama.cpp's greedy sampler."""
    import llama_cpp as ll

    from services.inference.core.types import BatchEntry

    backend = LlamaBackend(model_path, n_ctx=512, n_seq_max=NUM_SEQ, n_batch=256, n_threads=2)
    try:
        prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
        entries, idx, n = [], [], 0
        for seq, prompt in enumerate(prompts):
            tokens = backend.tokenize(prompt, True, True)
            backend.open_sampler(seq, SamplingParams())
            entries.append(BatchEntry(seq, tuple(tokens), 0, seq))
            n += len(tokens)
            idx.append(n - 1)
        assert backend._greedy == {0, 1, 2}
        sampled = backend.decode(entries)
        reference = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        ll.llama_sampler_chain_add(reference, ll.llama_sampler_init_greedy())
        try:
            for seq, i in enumerate(idx):
                assert sampled[seq] == ll.llama_sampler_sample(reference, backend._ctx, i)
        finally:
            ll.llama_sampler_free(reference)
        # Anything that reshapes the logits keeps llama.cpp's sampler.
        backend.open_sampler(9, SamplingParams(repeat_penalty=1.3))
        backend.open_sampler(10, SamplingParams(temperature=0.7, seed=1))
        assert 9 not in backend._greedy and 10 not in backend._greedy
        backend.close_sampler(0)
        assert 0 not in backend._greedy
    finally:
        backend.close()


PADDED_PROMPTS = [*PROMPTS, "The quick brown fox jumps over the lazy", "Monday, Tuesday, Wednesday,"]


def greedy_bare_loop(backend: LlamaBackend, prompts: list, steps: int) -> tuple[list[list[int]], list[int]]:
    """Decode ``prompts`` (texts or token lists) together, greedy, straight on the backend;
    also the tokens each step sent."""
    from services.inference.core.types import BatchEntry

    tokens = [backend.tokenize(p, True, True) if isinstance(p, str) else p for p in prompts]
    for key in range(len(prompts)):
        backend.open_sampler(key, SamplingParams())
    out: list[list[int]] = [[] for _ in prompts]
    sent = []
    entries = [BatchEntry(i, tuple(t), 0, i) for i, t in enumerate(tokens)]
    for _ in range(steps):
        sampled = backend.decode(entries)
        sent.append(backend._batch.n_tokens)
        for i, token in sampled.items():
            out[i].append(token)
        entries = [BatchEntry(i, (out[i][-1],), len(tokens[i]) + len(out[i]) - 1, i) for i in range(len(prompts))]
    for key in range(len(prompts)):
        backend.close_sampler(key)
    return out, sent


def test_padding_the_logits_rows_keeps_every_sequences_tokens_and_leaves_no_cells(model_path):
    import llama_cpp as ll

    plain = LlamaBackend(model_path, n_ctx=512, n_seq_max=6, n_batch=256, n_threads=2)
    padded = LlamaBackend(model_path, n_ctx=512, n_seq_max=6, n_batch=256, n_threads=2, output_rows_multiple=4)
    try:
        expected, plain_sent = greedy_bare_loop(plain, PADDED_PROMPTS, 6)
        got, padded_sent = greedy_bare_loop(padded, PADDED_PROMPTS, 6)
        assert got == expected
        # The prompt step has rows without logits to spare; the decode steps of five
        # sequences each carry three scratch tokens, removed again afterwards.
        assert padded_sent[0] == plain_sent[0]
        assert padded_sent[1:] == [8] * 5 and plain_sent[1:] == [5] * 5
        assert ll.llama_memory_seq_pos_max(padded._mem, padded.n_seq_max) == -1
        assert padded.n_seq_max == 6 and padded._free_cells() == plain._free_cells()
    finally:
        plain.close()
        padded.close()


def test_no_padding_without_free_cells_or_at_four_rows_or_fewer(model_path):
    backend = LlamaBackend(model_path, n_ctx=256, n_seq_max=5, n_batch=256, n_threads=2, output_rows_multiple=4)
    try:
        # Five prompts that leave room for one step plus three scratch cells, but not for two steps plus three.
        length = (backend.n_ctx - 8) // 5
        word = backend.tokenize(" word", False, False)
        prompt = backend.tokenize("", True, False) + word * (length - 1)
        assert len(prompt) == length
        _, sent = greedy_bare_loop(backend, [list(prompt)] * 5, 3)
        assert sent[1] == 8 and sent[2] == 5
        assert backend._free_cells() == backend.n_ctx - 5 * (length + 2)
        for seq in range(5):
            backend.seq_truncate(seq, 0)
        _, sent = greedy_bare_loop(backend, [list(prompt)] * 4, 2)
        assert sent[1] == 4
    finally:
        backend.close()


def test_more_sequences_than_n_batch_is_refused_naming_the_field(model_path):
    # llama.cpp itself would abort the process on such a context.
    from services.common.errors import InvalidArgument

    with pytest.raises(InvalidArgument) as info:
        LlamaBackend(model_path, n_ctx=512, n_seq_max=65, n_batch=64, n_threads=2)
    assert info.value.field == "n_seq_max"


def test_a_context_without_room_for_the_scratch_sequence_decodes_unpadded(model_path):
    backend = LlamaBackend(model_path, n_ctx=512, n_seq_max=8, n_batch=8, n_threads=2, output_rows_multiple=4)
    try:
        assert backend._context_seqs == 8
        _, sent = greedy_bare_loop(backend, [[2]] * 5, 2)  # five one-token prompts
        assert sent == [5, 5]
        with pytest.raises(ValueError):
            greedy_bare_loop(backend, [[2, 9]] * 5, 1)  # 10 tokens: refused before anything is written
    finally:
        backend.close()
