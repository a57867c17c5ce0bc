"""Shared prefixes across sequences: the block index, shared cells counted once, tenants kept apart."""
from __future__ import annotations

import random

from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.engine import choice_spec, execute
from services.inference.core.kv_slots import KVSlotTable
from services.inference.core.prefixes import TokenBlockIndex, deepest_match, summarize, text_prefix_hashes
from services.inference.core.scheduler import Request, Scheduler
from services.inference.core.types import GenerateSpec, SamplingParams, next_key
from tests.inference.test_scheduler import Collected, drive

BLOCK = 8
# 40 bytes: five blocks of the synthetic byte tokenizer (plus BOS).
PREFIX = "You are a careful agent. Tools follow.. "


def make(n_seq: int = 4, n_ctx: int = 1024, block: int = BLOCK) -> tuple[Scheduler, SyntheticBackend]:
    backend = SyntheticBackend(n_ctx=n_ctx, n_seq_max=n_seq, n_batch=64, tokens_per_s=0, record_decodes=True)
    return Scheduler(backend, n_seq, n_ctx, 64, block_tokens=block), backend


def submit(scheduler: Scheduler, prompt: str, *, session: str = "", tenant: str = "t1",
           max_tokens: int = 4) -> Collected:
    out = Collected()
    spec = GenerateSpec(prompt=prompt, session_id=session, tenant_id=tenant,
                        sampling=SamplingParams(max_tokens=max_tokens))
    scheduler.add(Request(key=next_key(), spec=spec, sink=out, arrival=0.0))
    return out


def cold_text(prompt: str, max_tokens: int = 4) -> str:
    scheduler, backend = make(block=0)
    out = submit(scheduler, prompt, max_tokens=max_tokens)
    drive(scheduler, backend)
    assert out.last.usage.cached_tokens == 0
    return out.text


def assert_table_matches_backend(scheduler: Scheduler, backend: SyntheticBackend) -> None:
    """Every sequence's tokens are what the model's cells hold, and shared cells are counted once."""
    table = scheduler.table
    for slot in table.slots:
        assert slot.tokens == backend._history[slot.seq_id]
        assert len(slot.cells) == len(slot.tokens)
    distinct = {cell for slot in table.slots for cell in slot.cells}
    assert table.used_cells == len(distinct)


def test_a_new_session_shares_another_sessions_prefix_and_decodes_like_a_cold_run():
    scheduler, backend = make()
    first = submit(scheduler, PREFIX + "question one?", session="s1")
    drive(scheduler, backend)
    assert first.last.usage.cached_tokens == 0
    second = submit(scheduler, PREFIX + "another question?", session="s2")
    drive(scheduler, backend)
    shared = 1 + len(PREFIX)  # BOS and the prefix bytes
    assert second.last.usage.cached_tokens >= shared
    assert second.text == cold_text(PREFIX + "another question?")
    table = scheduler.table
    assert table.held_cells - table.used_cells == second.last.usage.cached_tokens
    assert_table_matches_backend(scheduler, backend)


def test_another_tenant_never_shares_the_cells_of_the_same_prefix():
    scheduler, backend = make()
    submit(scheduler, PREFIX + "question one?", session="s1", tenant="acme")
    drive(scheduler, backend)
    other = submit(scheduler, PREFIX + "question one?", session="s2", tenant="globex")
    drive(scheduler, backend)
    assert other.last.usage.cached_tokens == 0
    anonymous = submit(scheduler, PREFIX + "question one?", tenant="globex-2")
    drive(scheduler, backend)
    assert anonymous.last.usage.cached_tokens == 0
    assert scheduler.table.held_cells == scheduler.table.used_cells
    assert_table_matches_backend(scheduler, backend)


def test_a_finished_anonymous_requests_stale_cells_are_shared_by_the_next_of_its_tenant():
    scheduler, backend = make()
    submit(scheduler, PREFIX + "one", tenant="acme")
    drive(scheduler, backend)
    again = submit(scheduler, PREFIX + "two", tenant="acme", session="s")
    drive(scheduler, backend)
    assert again.last.usage.cached_tokens >= 1 + len(PREFIX)


def test_evicting_one_of_two_sessions_sharing_a_prefix_leaves_the_other_intact():
    scheduler, backend = make(n_seq=2)
    a = submit(scheduler, PREFIX + "session a", session="a")
    drive(scheduler, backend)
    b = submit(scheduler, PREFIX + "session b", session="b")
    drive(scheduler, backend)
    assert b.last.usage.cached_tokens >= 1 + len(PREFIX)
    # A third session evicts the least recent one (a); its shared cells stay with b.
    submit(scheduler, "an unrelated third session", session="c")
    drive(scheduler, backend)
    assert scheduler.table.resident("a") is None and "a" in scheduler.table.saved
    assert_table_matches_backend(scheduler, backend)
    follow_b = PREFIX + "session b" + b.text + " next"
    b2 = submit(scheduler, follow_b, session="b")
    drive(scheduler, backend)
    assert b2.last.usage.cached_tokens > len(PREFIX + "session b")
    assert b2.text == cold_text(follow_b)
    # And a's saved state still restores and decodes the same.
    follow_a = PREFIX + "session a" + a.text + " next"
    a2 = submit(scheduler, follow_a, session="a")
    drive(scheduler, backend)
    assert a2.last.usage.cached_tokens > len(PREFIX + "session a")
    assert a2.text == cold_text(follow_a)
    assert_table_matches_backend(scheduler, backend)


def test_choices_fork_from_one_prefill():
    scheduler, backend = make()
    spec = GenerateSpec(prompt=PREFIX + "pick three", tenant_id="t1", n=3,
                        sampling=SamplingParams(max_tokens=3, seed=1))
    outs: list[Collected] = []
    parent: Request | None = None
    for index in range(3):
        outs.append(Collected())
        request = Request(key=next_key(), spec=choice_spec(spec, index), sink=outs[-1], arrival=0.0, parent=parent)
        parent = parent or request
        scheduler.add(request)
    drive(scheduler, backend)
    prompt_len = 1 + len(PREFIX + "pick three")
    prefilled = sum(len(e.tokens) for call in backend.decode_calls for e in call if len(e.tokens) > 1)
    # One prefill of the prompt; each other choice decodes only its last prompt token.
    assert prefilled == prompt_len
    assert [out.last.usage.cached_tokens for out in outs] == [0, prompt_len - 1, prompt_len - 1]
    assert_table_matches_backend(scheduler, backend)


def test_a_stale_sequence_whose_cells_are_all_shared_frees_nothing():
    table = KVSlotTable(num_sequences=2, num_cells=100, block_tokens=4)
    a, b = table.slots
    table.adopt(a, "t", "")
    table.append(a, list(range(10)))
    table.share(a, b, 10)
    assert table.used_cells == 10 and table.held_cells == 20
    assert table.exclusive_cells(a) == 0
    table.truncate(a, 0)
    assert table.used_cells == 10 and table.exclusive_cells(b) == 10
    table.truncate(b, 4)
    assert table.used_cells == 4


def test_random_traffic_keeps_the_table_and_the_model_in_step():
    rng = random.Random(7)
    scheduler, backend = make(n_seq=3, n_ctx=400)
    prefixes = [PREFIX, "Another system prompt, quite long too.. ", "x" * 24]
    history: dict[str, str] = {}
    for i in range(60):
        session = rng.choice(["", "s1", "s2", "s3", "s4", "s5"])
        tenant = rng.choice(["acme", "acme", "globex"])
        key = f"{tenant}/{session}" if session else ""
        if key and key in history and rng.random() < 0.6:
            prompt = history[key] + f" turn {i}"
        else:
            prompt = rng.choice(prefixes) + f"q{i}"
        out = submit(scheduler, prompt, session=key, tenant=tenant, max_tokens=rng.randint(1, 6))
        steps = 0
        while scheduler.has_work and steps < 3:
            plan = scheduler.plan()
            scheduler.apply(plan, execute(backend, plan))
            steps += 1
            assert_table_matches_backend(scheduler, backend)
        drive(scheduler, backend)
        assert_table_matches_backend(scheduler, backend)
        assert out.last.usage is not None
        if key:
            history[key] = prompt + out.text
    assert scheduler.table.used_cells <= scheduler.table.num_cells


def test_the_block_index_finds_the_deepest_holder_of_the_same_tenant():
    index = TokenBlockIndex(4)
    index.update(0, "t", list(range(12)))
    index.update(1, "t", list(range(8)) + [99, 98, 97, 96])
    index.update(2, "u", list(range(12)))
    assert index.holders("t", list(range(12)) + [5]) == (3, {0})
    assert index.holders("t", list(range(8)) + [1, 2, 3, 4]) == (2, {0, 1})
    index.update(0, "t", list(range(5)), unchanged=5)
    assert index.holders("t", list(range(12))) == (2, {1})
    assert index.holders("v", list(range(12))) == (0, set())


def test_text_hashes_are_stable_chains_scoped_by_tenant():
    text = "a" * 300 + "b" * 300
    hashes = text_prefix_hashes("t", text, block_chars=100)
    assert len(hashes) == 6 and len(set(hashes)) == 6
    assert hashes == text_prefix_hashes("t", text, block_chars=100)
    assert text_prefix_hashes("u", text, block_chars=100)[0] != hashes[0]
    longer = text_prefix_hashes("t", "a" * 300 + "c" * 300, block_chars=100)
    assert deepest_match(longer, set(hashes)) == 3
    assert summarize([hashes, longer], limit=4) == [hashes[0], hashes[1], hashes[2], hashes[3]]
