"""One sequence at a time on a backend (the in-process model's loop), on the synthetic backend."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.one_sequence import OneSequence
from services.inference.core.types import FinishReason, SamplingParams


def run(sequence: OneSequence, prompt: list[int], **params) -> tuple[str, list]:
    deltas = list(sequence.generate(prompt, SamplingParams(**params)))
    return "".join(d.text for d in deltas), deltas


def prompt_of(backend: SyntheticBackend, text: str) -> list[int]:
    return backend.tokenize(text, True, True)


def test_text_usage_and_length_finish() -> None:
    backend = SyntheticBackend(n_ctx=256, n_seq_max=1, tokens_per_s=0)
    text, deltas = run(OneSequence(backend), prompt_of(backend, "hello"), max_tokens=6)
    last = deltas[-1]
    assert last.finish_reason is FinishReason.LENGTH
    assert last.usage.generated_tokens == 6 and last.usage.prompt_tokens == 6 and last.usage.cached_tokens == 0
    assert len(text) == 6 and all(d.finish_reason is None for d in deltas[:-1])


def test_a_follow_up_reuses_the_common_prefix_and_says_the_same_as_a_cold_run() -> None:
    warm_backend = SyntheticBackend(n_ctx=512, n_seq_max=1, tokens_per_s=0)
    warm = OneSequence(warm_backend)
    first_text, _ = run(warm, prompt_of(warm_backend, "turn one "), max_tokens=5)
    follow_up = prompt_of(warm_backend, "turn one " + first_text + " and two")
    warm_text, deltas = run(warm, follow_up, max_tokens=8)
    # The answer's last token was sampled but never decoded, so the cache lacks it.
    assert deltas[-1].usage.cached_tokens == len(prompt_of(warm_backend, "turn one ")) + 5 - 1
    cold_backend = SyntheticBackend(n_ctx=512, n_seq_max=1, tokens_per_s=0)
    assert run(OneSequence(cold_backend), follow_up, max_tokens=8)[0] == warm_text
    # The very same prompt again decodes its last token again and answers the same.
    assert run(warm, follow_up, max_tokens=8)[0] == warm_text


def test_a_prompt_longer_than_a_batch_is_decoded_in_chunks() -> None:
    backend = SyntheticBackend(n_ctx=512, n_seq_max=1, n_batch=16, tokens_per_s=0, record_decodes=True)
    prompt = prompt_of(backend, "x" * 40)
    run(OneSequence(backend), prompt, max_tokens=2)
    prefill = [call[0] for call in backend.decode_calls[:3]]
    assert [len(e.tokens) for e in prefill] == [16, 16, 9]
    assert [e.sampler_key is not None for e in prefill] == [False, False, True]


def test_a_stop_string_ends_the_text_before_it() -> None:
    backend = SyntheticBackend(n_ctx=256, n_seq_max=1, tokens_per_s=0)
    free_text, _ = run(OneSequence(backend), prompt_of(backend, "hello"), max_tokens=30)
    stop = free_text[10:13]
    backend = SyntheticBackend(n_ctx=256, n_seq_max=1, tokens_per_s=0)
    text, deltas = run(OneSequence(backend), prompt_of(backend, "hello"), max_tokens=30, stop=(stop,))
    assert deltas[-1].finish_reason is FinishReason.STOP
    assert text == free_text[:free_text.index(stop)]


def test_cancelling_between_tokens_and_the_context_bounds_the_length() -> None:
    backend = SyntheticBackend(n_ctx=32, n_seq_max=1, tokens_per_s=0)
    sequence = OneSequence(backend)
    asked = []
    deltas = list(sequence.generate(prompt_of(backend, "hi"), SamplingParams(max_tokens=20),
                                    lambda: asked.append(1) or len(asked) >= 3))
    assert deltas[-1].finish_reason is FinishReason.CANCELLED and deltas[-1].usage.generated_tokens == 3
    _, deltas = run(sequence, prompt_of(backend, "hello there"), max_tokens=0)
    assert deltas[-1].usage.generated_tokens == 32 - 12


@pytest.mark.parametrize("prompt, reason", [([], "no tokens"), ([5, 99999], "outside the vocabulary"),
                                            (list(range(2, 40)), "context holds")])
def test_bad_prompts_name_prompt_tokens(prompt, reason) -> None:
    backend = SyntheticBackend(n_ctx=32, n_seq_max=1, tokens_per_s=0)
    with pytest.raises(InvalidArgument) as caught:
        run(OneSequence(backend), prompt, max_tokens=2)
    assert caught.value.field == "prompt_tokens" and reason in caught.value.message
    assert backend.samplers_opened == 0


def test_a_scripted_reply_is_written_whole_then_ends_every_generation() -> None:
    reply = '<tool_call>{"name": "shell_exec", "arguments": {"command": "true"}}</tool_call>'
    backend = SyntheticBackend(n_ctx=1024, n_seq_max=1, tokens_per_s=0, reply=reply)
    sequence = OneSequence(backend)
    for prompt in ("first", "a second, different prompt"):
        text, deltas = run(sequence, prompt_of(backend, prompt), max_tokens=200)
        assert text == reply
        assert deltas[-1].finish_reason is FinishReason.STOP
    assert run(sequence, prompt_of(backend, "short"), max_tokens=5)[0] == reply[:5]
