"""Continuous batching, KV reuse, eviction and fair prefill on the synthetic backend."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument, NotFound
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.budget import PrefillBudget
from services.inference.core.engine import execute
from services.inference.core.scheduler import Request, Scheduler
from services.inference.core.types import Delta, FinishReason, GenerateSpec, SamplingParams, next_key


class Collected:
    def __init__(self) -> None:
        self.deltas: list[Delta] = []

    def __call__(self, delta: Delta) -> None:
        self.deltas.append(delta)

    @property
    def text(self) -> str:
        return "".join(d.text for d in self.deltas)

    @property
    def last(self) -> Delta:
        return self.deltas[-1]


def make_scheduler(n_seq: int = 4, n_ctx: int = 512, n_batch: int = 64,
                   budget: PrefillBudget | None = None) -> tuple[Scheduler, SyntheticBackend]:
    backend = SyntheticBackend(n_ctx=n_ctx, n_seq_max=n_seq, n_batch=n_batch, tokens_per_s=0,
                               record_decodes=True)
    return Scheduler(backend, n_seq, n_ctx, n_batch, budget=budget), backend


def submit(scheduler: Scheduler, prompt: str = "hello", *, session: str = "", max_tokens: int = 5,
           stop: tuple[str, ...] = (), require_session: bool = False, clock: float = 0.0) -> Collected:
    out = Collected()
    spec = GenerateSpec(prompt=prompt, session_id=session,
                        sampling=SamplingParams(max_tokens=max_tokens, stop=stop))
    scheduler.add(Request(key=next_key(), spec=spec, sink=out, arrival=clock, require_session=require_session))
    return out


def drive(scheduler: Scheduler, backend: SyntheticBackend, max_steps: int = 1000) -> int:
    steps = 0
    while scheduler.has_work and steps < max_steps:
        plan = scheduler.plan()
        scheduler.apply(plan, execute(backend, plan))
        steps += 1
    assert not scheduler.has_work, "scheduler did not drain"
    return steps


def test_requests_decode_together_in_one_batch_per_step():
    scheduler, backend = make_scheduler()
    outs = [submit(scheduler, f"prompt {i}", max_tokens=6) for i in range(3)]
    drive(scheduler, backend)
    decode_steps = [call for call in backend.decode_calls if all(len(e.tokens) == 1 for e in call)]
    assert max(len(call) for call in decode_steps) == 3
    for out in outs:
        assert out.last.finish_reason is FinishReason.LENGTH
        assert out.last.usage.generated_tokens == 6
        assert len([t for d in out.deltas for t in d.token_ids]) == 6


def test_batched_output_equals_output_alone():
    alone_scheduler, alone_backend = make_scheduler()
    alone = submit(alone_scheduler, "the same prompt", max_tokens=8)
    drive(alone_scheduler, alone_backend)
    scheduler, backend = make_scheduler()
    together = [submit(scheduler, p, max_tokens=8) for p in ("other one", "the same prompt", "x")]
    drive(scheduler, backend)
    assert together[1].text == alone.text


def test_follow_up_turn_prefills_only_new_tokens_and_matches_cold_run():
    scheduler, backend = make_scheduler()
    first = submit(scheduler, "turn one. ", session="s1", max_tokens=6)
    drive(scheduler, backend)
    follow_up = "turn one. " + first.text + " turn two."
    warm = submit(scheduler, follow_up, session="s1", max_tokens=6)
    drive(scheduler, backend)
    cold_scheduler, cold_backend = make_scheduler()
    cold = submit(cold_scheduler, follow_up, max_tokens=6)
    drive(cold_scheduler, cold_backend)
    usage = warm.last.usage
    # BOS + 10 prompt bytes + 5 of the 6 generated tokens were decoded into the cache.
    assert usage.cached_tokens == 1 + len("turn one. ") + 5
    assert usage.prompt_tokens == cold.last.usage.prompt_tokens
    assert cold.last.usage.cached_tokens == 0
    assert warm.text == cold.text


def test_identical_prompt_reuses_all_but_the_last_token():
    scheduler, backend = make_scheduler()
    submit(scheduler, "repeat me", max_tokens=3)
    drive(scheduler, backend)
    again = submit(scheduler, "repeat me", max_tokens=3)
    drive(scheduler, backend)
    assert again.last.usage.cached_tokens == again.last.usage.prompt_tokens - 1


def test_evicted_session_is_restored_from_saved_state():
    scheduler, backend = make_scheduler(n_seq=1)
    first = submit(scheduler, "session a. ", session="a", max_tokens=4)
    drive(scheduler, backend)
    submit(scheduler, "session b takes the only sequence", session="b", max_tokens=4)
    drive(scheduler, backend)
    assert scheduler.table.resident("a") is None and "a" in scheduler.table.saved
    back = submit(scheduler, "session a. " + first.text + " more", session="a", max_tokens=4)
    drive(scheduler, backend)
    assert back.last.usage.cached_tokens > len("session a. ")
    assert scheduler.table.resident("a") is not None


def test_stop_string_ends_generation_without_sending_it():
    scheduler, backend = make_scheduler()
    probe = submit(scheduler, "zz", max_tokens=12)
    drive(scheduler, backend)
    stop = probe.text[4:6]
    out = submit(scheduler, "zz", max_tokens=12, stop=(stop,))
    drive(scheduler, backend)
    assert out.last.finish_reason is FinishReason.STOP
    assert out.text == probe.text[: probe.text.index(stop)]


def test_long_prompt_is_prefilled_in_chunks_while_streams_keep_decoding():
    budget = PrefillBudget(itl_target_ms=1e9, min_tokens=8, max_tokens=8)
    scheduler, backend = make_scheduler(n_batch=64, budget=budget)
    running = submit(scheduler, "short", max_tokens=40)
    for _ in range(3):
        plan = scheduler.plan()
        scheduler.apply(plan, execute(backend, plan))
    submit(scheduler, "L" * 60, max_tokens=2)
    calls_before = len(backend.decode_calls)
    drive(scheduler, backend)
    mixed = backend.decode_calls[calls_before:calls_before + 8]
    for call in mixed:
        assert sum(len(e.tokens) for e in call if len(e.tokens) > 1 or e.sampler_key is None) <= 8
        assert any(len(e.tokens) == 1 and e.sampler_key is not None for e in call)
    assert running.last.usage.generated_tokens == 40


def test_more_requests_than_sequences_wait_then_run():
    scheduler, backend = make_scheduler(n_seq=2)
    outs = [submit(scheduler, f"p{i}", max_tokens=3) for i in range(5)]
    plan = scheduler.plan()
    assert len(scheduler.running) == 2 and len(scheduler.waiting) == 3
    scheduler.apply(plan, execute(backend, plan))
    drive(scheduler, backend)
    assert all(o.last.finish_reason is FinishReason.LENGTH for o in outs)


def test_cancel_frees_the_sequence_and_reports_cancelled():
    scheduler, backend = make_scheduler(n_seq=1)
    out = submit(scheduler, "hello", max_tokens=50)
    for _ in range(3):
        plan = scheduler.plan()
        scheduler.apply(plan, execute(backend, plan))
    scheduler.cancel(scheduler.running[0].key)
    assert out.last.finish_reason is FinishReason.CANCELLED
    assert scheduler.table.num_free == 1
    nxt = submit(scheduler, "next", max_tokens=2)
    drive(scheduler, backend)
    assert nxt.last.finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("prompt,error,field", [
    ("x" * 600, InvalidArgument, "prompt"),
])
def test_prompt_longer_than_context_is_rejected_naming_the_field(prompt, error, field):
    scheduler, backend = make_scheduler(n_ctx=512)
    out = submit(scheduler, prompt)
    drive(scheduler, backend)
    assert isinstance(out.last.error, error)
    assert out.last.error.field == field


def test_unknown_session_is_not_found_when_the_cache_is_required():
    scheduler, backend = make_scheduler()
    out = submit(scheduler, "hi", session="never-seen", require_session=True)
    drive(scheduler, backend)
    assert isinstance(out.last.error, NotFound)
    assert out.last.error.field == "session_id"


def test_kv_cells_running_out_evicts_idle_sessions():
    scheduler, backend = make_scheduler(n_seq=4, n_ctx=128)
    submit(scheduler, "a" * 50, session="a", max_tokens=2)
    drive(scheduler, backend)
    submit(scheduler, "b" * 50, session="b", max_tokens=2)
    drive(scheduler, backend)
    big = submit(scheduler, "c" * 60, max_tokens=2)
    drive(scheduler, backend)
    assert big.last.finish_reason is FinishReason.LENGTH
    assert "a" in scheduler.table.saved
    assert scheduler.table.used_cells <= 128
