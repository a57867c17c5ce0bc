"""A model-free backend that streams tokens at a fixed rate.

It runs behind the same engine, scheduler and servicer as llama.cpp, so load
balancer tests and load tests can start several cheap nodes. Tokens are bytes
(id = byte + 2; 0 is BOS, 1 is EOS); the next token is a pure function of the
sequence's history, so a reused or restored cache yields the same text as a
cold run, and the backend checks positions the way llama.cpp does.

With ``reply`` set, every generation writes that text and then ends (EOS)
instead of the endless filler: a scripted answer, e.g. a tool call, for
tests and benchmarks of the agent loop on a model-free mesh.
"""
from __future__ import annotations

import time
from collections.abc import Sequence

from services.common.errors import InvalidArgument
from services.inference.core.types import BatchEntry, SamplingParams, TokenLogprob

BOS = 0
EOS = 1
BYTE_OFFSET = 2
TEXT = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor incididunt "


class SyntheticBackend:
    def __init__(
        self,
        *,
        n_ctx: int = 8192,
        n_seq_max: int = 16,
        n_batch: int = 512,
        tokens_per_s: float = 50.0,
        ttft_ms: float = 0.0,
        prefill_ms_per_token: float = 0.0,
        model_name: str = "synthetic",
        record_decodes: bool = False,
        reply: str = "",
    ) -> None:
        self.model_name = model_name
        self.device = "synthetic"
        self.n_gpu_layers = 0
        self.n_ctx = n_ctx
        self.n_seq_max = n_seq_max
        self.max_batch_tokens = n_batch
        self.tokens_per_s = tokens_per_s
        self.ttft_ms = ttft_ms
        self.prefill_ms_per_token = prefill_ms_per_token
        self._history: list[list[int]] = [[] for _ in range(n_seq_max)]
        self._samplers: dict[int, SamplingParams] = {}
        self._logprobs: dict[int, TokenLogprob] = {}
        self._reply = [b + BYTE_OFFSET for b in reply.encode("utf-8")]
        # Tokens sampled so far per sampler (where each generation is in the reply).
        self._sampled: dict[int, int] = {}
        # Counters are always kept; the batch-by-batch record only when asked for
        # (tests), since a long-running node would otherwise grow without bound.
        self.decode_count = 0
        self.samplers_opened = 0
        self.decode_calls: list[list[BatchEntry]] | None = [] if record_decodes else None

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        body = [b + BYTE_OFFSET for b in text.encode("utf-8")]
        return [BOS, *body] if add_special else body

    def token_piece(self, token: int) -> bytes:
        return bytes([token - BYTE_OFFSET]) if token >= BYTE_OFFSET else b""

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.token_piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def vocab_size(self) -> int:
        return 256 + BYTE_OFFSET

    def check_sampling(self, params: SamplingParams) -> None:
        # Grammars are accepted and ignored; an obviously broken one is still refused
        # so clients see the same error as on a real node.
        if params.grammar and "root" not in params.grammar:
            raise InvalidArgument("sampling.grammar: the GBNF grammar has no root rule", field="sampling.grammar")

    def open_sampler(self, key: int, params: SamplingParams) -> None:
        self._samplers[key] = params
        self._sampled[key] = 0
        self.samplers_opened += 1

    def close_sampler(self, key: int) -> None:
        self._samplers.pop(key, None)
        self._sampled.pop(key, None)

    def decode(self, entries: Sequence[BatchEntry]) -> dict[int, int]:
        self.decode_count += 1
        if self.decode_calls is not None:
            self.decode_calls.append(list(entries))
        if sum(len(e.tokens) for e in entries) > self.max_batch_tokens:
            raise ValueError("batch exceeds n_batch")
        sampled: dict[int, int] = {}
        num_prefill = 0
        completes_prompt = False
        decoding = False
        for entry in entries:
            history = self._history[entry.seq_id]
            if entry.start_pos != len(history):
                raise RuntimeError(f"seq {entry.seq_id}: position {entry.start_pos} after {len(history)} cells")
            history.extend(entry.tokens)
            if len(entry.tokens) == 1 and entry.sampler_key is not None and len(history) > 1:
                decoding = True
            else:
                num_prefill += len(entry.tokens)
                completes_prompt = completes_prompt or entry.sampler_key is not None
            if entry.sampler_key is not None:
                sampled[entry.sampler_key] = self._sample(entry.sampler_key, history)
                params = self._samplers.get(entry.sampler_key)
                if params is not None and params.logprobs:
                    self._logprobs[entry.sampler_key] = self._logprob(history, sampled[entry.sampler_key],
                                                                      params.top_logprobs)
        delay_ms = num_prefill * self.prefill_ms_per_token
        if decoding and self.tokens_per_s > 0:
            delay_ms += 1000.0 / self.tokens_per_s
        if completes_prompt:
            delay_ms += self.ttft_ms
        if delay_ms > 0:
            time.sleep(delay_ms / 1000.0)
        return sampled

    def _logprob(self, history: Sequence[int], token: int, top: int) -> TokenLogprob:
        """A made-up but repeatable confidence in [-0.9, 0]: a pure function of the history, like the
        token; the sampled token heads its alternatives, the next token ids follow, each less likely."""
        logprob = -(sum(history[-4:]) % 10) / 10.0
        others = [t % self.vocab_size() for t in range(token + 1, token + top)]
        return TokenLogprob(logprob, tuple((t, logprob - i) for i, t in enumerate([token, *others]))[:top])

    def take_logprobs(self) -> dict[int, TokenLogprob]:
        taken, self._logprobs = self._logprobs, {}
        return taken

    def _sample(self, key: int, history: Sequence[int]) -> int:
        if not self._reply:
            return self._next_token(history)
        position = self._sampled.get(key, 0)
        self._sampled[key] = position + 1
        return self._reply[position] if position < len(self._reply) else EOS

    @staticmethod
    def _next_token(history: Sequence[int]) -> int:
        index = (sum(history[-8:]) + len(history)) % len(TEXT)
        return TEXT[index] + BYTE_OFFSET

    def seq_truncate(self, seq_id: int, keep: int) -> None:
        del self._history[seq_id][keep:]

    def seq_copy(self, src_seq_id: int, seq_id: int, upto: int) -> None:
        if self._history[seq_id]:
            raise RuntimeError(f"seq {seq_id}: copy into a sequence that holds cells")
        self._history[seq_id] = list(self._history[src_seq_id][:upto])

    def seq_save(self, seq_id: int) -> bytes:
        return bytes(b for t in self._history[seq_id] for b in t.to_bytes(2, "little"))

    def seq_restore(self, seq_id: int, state: bytes) -> bool:
        if self._history[seq_id] or len(state) % 2:
            return False
        self._history[seq_id] = [int.from_bytes(state[i:i + 2], "little") for i in range(0, len(state), 2)]
        return True

    def close(self) -> None:
        self._samplers.clear()
