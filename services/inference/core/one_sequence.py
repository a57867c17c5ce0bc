"""One sequence at a time on a Backend: the engine's decode loop without its scheduler.

For a process that runs the model itself, one request after another (the
orchestrator's in-process model). Each call keeps the previous prompt's
longest common prefix in the KV cache and decodes only the rest, then samples
until an end-of-generation token, a stop string, ``max_tokens`` or the context
is full. Blocking: run it on a thread of its own.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence

from services.common.errors import InvalidArgument
from services.inference.core.backend import Backend
from services.inference.core.text import StreamText, check_token_ids, common_prefix_len
from services.inference.core.types import BatchEntry, Delta, FinishReason, SamplingParams, Usage, next_key

PROMPT_FIELD = "prompt_tokens"


class OneSequence:
    def __init__(self, backend: Backend, seq_id: int = 0) -> None:
        self.backend = backend
        self.seq_id = seq_id
        # The tokens the KV cache holds for seq_id, in order.
        self._cached: list[int] = []

    def generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Delta]:
        """Deltas of text; the last carries finish_reason and usage. ``cancelled`` is asked between tokens."""
        started = time.perf_counter()
        prompt = self._checked(prompt_tokens)
        room = self.backend.n_ctx - len(prompt)
        max_tokens = min(params.max_tokens, room) if params.max_tokens > 0 else room
        key = next_key()
        self.backend.open_sampler(key, params)
        try:
            num_cached, token = self._prefill(prompt, key)
            text = StreamText(params.stop)
            first_token_at = 0.0
            num_generated = 0
            finish = FinishReason.LENGTH
            while True:
                if self.backend.is_eog(token):
                    finish = FinishReason.STOP
                    break
                num_generated += 1
                first_token_at = first_token_at or time.perf_counter()
                piece = text.push(self.backend.token_piece(token))
                if piece:
                    yield Delta(text=piece, token_ids=(token,))
                if text.stopped:
                    finish = FinishReason.STOP
                    break
                if num_generated >= max_tokens:
                    break
                if cancelled():
                    finish = FinishReason.CANCELLED
                    break
                token = self._append([token], key)[key]
            ended = time.perf_counter()
            ttft_ms = ((first_token_at or ended) - started) * 1000
            yield Delta(text=text.flush(), finish_reason=finish, usage=Usage(
                prompt_tokens=len(prompt), cached_tokens=num_cached, generated_tokens=num_generated,
                ttft_ms=ttft_ms, total_ms=(ended - started) * 1000))
        except GeneratorExit:
            raise
        except BaseException:
            # A failed decode leaves the cache in a state this object no longer knows.
            self._forget()
            raise
        finally:
            self.backend.close_sampler(key)

    def _checked(self, prompt_tokens: Sequence[int]) -> list[int]:
        prompt = list(prompt_tokens)
        if not prompt:
            raise InvalidArgument(f"{PROMPT_FIELD}: the prompt has no tokens", field=PROMPT_FIELD)
        check_token_ids(prompt, self.backend.vocab_size(), PROMPT_FIELD)
        if len(prompt) >= self.backend.n_ctx:
            raise InvalidArgument(f"{PROMPT_FIELD}: the prompt takes {len(prompt)} tokens; the context holds "
                                  f"{self.backend.n_ctx}", field=PROMPT_FIELD)
        return prompt

    def _prefill(self, prompt: list[int], key: int) -> tuple[int, int]:
        """Decode what the cache lacks of ``prompt``: (tokens already cached, the first sampled token)."""
        # At least the last prompt token is decoded again: its logits give the first sample.
        keep = min(common_prefix_len(self._cached, prompt), len(prompt) - 1)
        self.backend.seq_truncate(self.seq_id, keep)
        del self._cached[keep:]
        step = self.backend.max_batch_tokens
        sampled: dict[int, int] = {}
        for start in range(keep, len(prompt), step):
            sampled = self._append(prompt[start:start + step], key if start + step >= len(prompt) else None)
        return keep, sampled[key]

    def _append(self, tokens: list[int], key: int | None = None) -> dict[int, int]:
        """Decode ``tokens`` onto the sequence; with ``key``, the token sampled after them."""
        sampled = self.backend.decode([BatchEntry(self.seq_id, tuple(tokens), len(self._cached), key)])
        self._cached.extend(tokens)
        return sampled

    def _forget(self) -> None:
        self._cached.clear()
        self.backend.seq_truncate(self.seq_id, 0)
