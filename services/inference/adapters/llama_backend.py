"""llama.cpp through llama-cpp-python's low-level ctypes API.

One context holds ``n_seq_max`` sequences in a unified KV cache of ``n_ctx``
cells, so a session can grow to the whole context while others are idle.
Loading, the context's parameters and the vocabulary are ``llama_model``'s.
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import llama_cpp as ll
import numpy as np

from services.common.errors import InvalidArgument, Unavailable
from services.inference.adapters.llama_model import LlamaVocab, create_context, load_model, put_tokens
from services.inference.core.types import BatchEntry, SamplingParams, TokenLogprob

# Most sequences one llama.cpp context takes.
LLAMA_MAX_SEQ = 256

# Penalties look this far back over generated tokens.
PENALTY_LAST_N = 64

# llama_token_data: id (int32), logit (float), p (float), packed as llama.cpp lays it out.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)])


class LlamaBackend:
    """A llama.cpp model + context decoding batches across sequences."""

    def __init__(
        self,
        model_path: str | Path,
        *,
        n_ctx: int = 8192,
        n_seq_max: int = 16,
        n_batch: int = 512,
        n_threads: int = 0,
        n_gpu_layers: int = 0,
        device_index: int = -1,
        device: str = "cpu",
        model_name: str = "",
        output_rows_multiple: int = 1,
        extra_buffers: str = "auto",
    ) -> None:
        if output_rows_multiple < 1:
            raise InvalidArgument("output_rows_multiple: must be >= 1", field="output_rows_multiple")
        # llama.cpp aborts the process on a context with more sequences than
        # n_batch (it reserves one logits row per sequence) and refuses more than 256.
        max_seqs = min(n_batch, LLAMA_MAX_SEQ)
        if not 1 <= n_seq_max <= max_seqs:
            raise InvalidArgument(f"n_seq_max: must be within [1, {max_seqs}] "
                                  f"(at most n_batch={n_batch} and {LLAMA_MAX_SEQ}), got {n_seq_max}",
                                  field="n_seq_max")
        self.model_name = model_name or Path(model_path).stem
        self.device = device
        self.n_gpu_layers = n_gpu_layers
        # The llama.cpp handles are None once closed.
        self._model: ll.llama_model_p | None = load_model(model_path, n_gpu_layers=n_gpu_layers,
                                                         device_index=device_index,
                                                         extra_buffers=extra_buffers)
        self._vocab = LlamaVocab(self._model)
        # One more sequence than the scheduler gets: scratch rows that pad the
        # logits rows of a step go there (see _pad_outputs). A context without
        # room for one more sequence goes without padding.
        self._pad_multiple = output_rows_multiple if n_seq_max < max_seqs else 1
        try:
            self._ctx: ll.llama_context_p | None = create_context(
                self._model, n_ctx=n_ctx, n_batch=n_batch, n_threads=n_threads,
                n_seq_max=n_seq_max + 1 if self._pad_multiple > 1 else n_seq_max)
        except RuntimeError:
            ll.llama_model_free(self._model)
            raise
        self._mem = ll.llama_get_memory(self._ctx)
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        self.n_seq_max = n_seq_max
        self._scratch_seq = n_seq_max
        self._context_seqs = ll.llama_n_seq_max(self._ctx)
        self.max_batch_tokens = ll.llama_n_batch(self._ctx)
        self._n_vocab = self._vocab.n_tokens
        self._pad_token = max(0, self._vocab.bos)
        self._batch = ll.llama_batch_init(self.max_batch_tokens, 0, 1)
        self._samplers: dict[int, ll.llama_sampler_p] = {}
        # Grammar samplers, apart from the chains: checked against the chain's pick (see _sample_constrained).
        self._grammars: dict[int, ll.llama_sampler_p] = {}
        token_ids = np.arange(self._vocab.n_tokens, dtype=np.int32)
        self._candidates = np.zeros(self._vocab.n_tokens, dtype=_TOKEN_DATA)
        self._candidates["id"] = token_ids
        # sampler key -> how many likeliest alternatives to report (0: only the sampled token's logprob).
        self._wants_logprobs: dict[int, int] = {}
        # Held by the calls other threads make (tokenizing, checking a grammar on the event loop) and by
        # close: the weights are never freed under a call that reads them.
        self._shared_calls = threading.Lock()
        # Keys whose sampling is a plain argmax (see _is_plain_greedy).
        self._greedy: set[int] = set()
        self._logprobs: dict[int, TokenLogprob] = {}

    @property
    def llama_model(self) -> ll.llama_model_p:
        """The loaded weights, for another context over them (the embedder's)."""
        assert self._model is not None, "the backend is closed"
        return self._model

    # -- vocabulary -------------------------------------------------------

    @contextlib.contextmanager
    def _open_model(self) -> Iterator[None]:
        with self._shared_calls:
            if self._model is None:
                raise Unavailable("the inference engine is stopping", reason="ENGINE_STOPPED")
            yield

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        with self._open_model():
            return self._vocab.tokenize(text, add_special, parse_special)

    def token_piece(self, token: int) -> bytes:
        return self._vocab.token_piece(token)

    def detokenize(self, tokens: Sequence[int]) -> str:
        with self._open_model():
            return self._vocab.detokenize(tokens)

    def is_eog(self, token: int) -> bool:
        return self._vocab.is_eog(token)

    def vocab_size(self) -> int:
        return self._n_vocab

    # -- sampling ---------------------------------------------------------

    def _build_grammar(self, params: SamplingParams) -> ll.llama_sampler_p:
        grammar = ll.llama_sampler_init_grammar(self._vocab.handle, params.grammar.encode(), b"root")
        if not grammar:
            raise InvalidArgument("sampling.grammar: the GBNF grammar does not parse (needs a root rule)",
                                  field="sampling.grammar")
        return grammar

    def _build_sampler(self, params: SamplingParams) -> ll.llama_sampler_p:
        """The chain without the grammar (that one is kept apart: see _sample_constrained)."""
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        if params.repeat_penalty != 1.0:
            ll.llama_sampler_chain_add(
                chain, ll.llama_sampler_init_penalties(self._n_vocab, PENALTY_LAST_N, params.repeat_penalty, 0.0, 0.0))
        if params.temperature <= 0.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_greedy())
            return chain
        if params.top_k > 0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(params.top_k))
        if 0.0 < params.top_p < 1.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(params.top_p, 1))
        if params.min_p > 0.0:
            ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_min_p(params.min_p, 1))
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(params.temperature))
        seed = params.seed if params.seed is not None else ll.LLAMA_DEFAULT_SEED
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
        return chain

    def check_sampling(self, params: SamplingParams) -> None:
        if params.grammar:
            with self._open_model():
                ll.llama_sampler_free(self._build_grammar(params))

    @staticmethod
    def _is_plain_greedy(params: SamplingParams) -> bool:
        """Greedy with nothing that reshapes the logits first (no grammar, no penalty)."""
        return params.temperature <= 0.0 and not params.grammar and params.repeat_penalty == 1.0

    def open_sampler(self, key: int, params: SamplingParams) -> None:
        if params.grammar:
            self._grammars[key] = self._build_grammar(params)
        self._samplers[key] = self._build_sampler(params)
        if params.logprobs:
            self._wants_logprobs[key] = params.top_logprobs
        if self._is_plain_greedy(params):
            self._greedy.add(key)

    def close_sampler(self, key: int) -> None:
        grammar = self._grammars.pop(key, None)
        if grammar is not None:
            ll.llama_sampler_free(grammar)
        sampler = self._samplers.pop(key, None)
        self._wants_logprobs.pop(key, None)
        self._greedy.discard(key)
        if sampler is not None:
            ll.llama_sampler_free(sampler)

    # -- decoding ---------------------------------------------------------

    def decode(self, entries: Sequence[BatchEntry]) -> dict[int, int]:
        total = sum(len(entry.tokens) for entry in entries)
        if total > self.max_batch_tokens:  # checked before anything is written into the batch
            raise ValueError(f"batch of {total} tokens exceeds n_batch {self.max_batch_tokens}")
        batch = self._batch
        n = 0
        wanted: list[tuple[int, int]] = []
        for entry in entries:
            n = put_tokens(batch, n, entry.tokens, entry.start_pos, entry.seq_id, entry.sampler_key is not None)
            if entry.sampler_key is not None and entry.tokens:
                wanted.append((entry.sampler_key, n - 1))
        if n == 0:
            return {}
        scratch = self._pad_outputs(batch, n, len(wanted)) if len(wanted) > self._pad_multiple > 1 else 0
        batch.n_tokens = n + scratch
        rc = ll.llama_decode(self._ctx, batch)
        if scratch:
            ll.llama_memory_seq_rm(self._mem, self._scratch_seq, -1, -1)
            if rc == 1:  # no cells for the scratch rows after all (the cache left unchanged): without them
                batch.n_tokens = n
                rc = ll.llama_decode(self._ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc}")
        sampled = {key: self._argmax(idx) if key in self._greedy
                   else self._sample_constrained(key, idx) if key in self._grammars
                   else ll.llama_sampler_sample(self._samplers[key], self._ctx, idx) for key, idx in wanted}
        for key, idx in wanted:
            if key in self._wants_logprobs:
                self._logprobs[key] = self._token_logprob(idx, sampled[key], self._wants_logprobs[key])
        return sampled

    def _pad_outputs(self, batch: ll.llama_batch, n: int, outputs: int) -> int:
        """Round the step's logits rows up to a multiple of ``output_rows_multiple``.

        On CPU the projection onto Gemma 3's 262,144-token vocabulary dominates
        a decode step, and past four rows llama.cpp's kernels for it run
        fastest on row counts that are multiples of four: on a 2-core AVX-512
        machine a step with 5, 6 or 7 logits rows took 46, 52 and 56 ms against
        44 ms with 8 (and 9-11 rows 60-67 ms against 57 ms with 12). Up to four
        rows the cost grows with each row (13, 23, 28, 31 ms), so only steps
        with more rows than the multiple are padded. Prompt rows of this step
        that need no logits get them first (they are decoded anyway); the rest
        are scratch tokens on a sequence of their own, removed right after the
        decode, when the batch and the free cells allow. Returns the number of
        scratch tokens added after row ``n``.
        """
        missing = -outputs % self._pad_multiple
        for i in range(n - 1, -1, -1):
            if not missing:
                return 0
            if not batch.logits[i]:
                batch.logits[i] = True
                missing -= 1
        if not missing or n + missing > self.max_batch_tokens or self._free_cells() < n + missing:
            return 0
        for j in range(missing):
            row = n + j
            batch.token[row] = self._pad_token
            # llama_cpp annotates pos (llama_pos*, one per token) as an array of arrays.
            batch.pos[row] = j  # type: ignore[call-overload]
            batch.n_seq_id[row] = 1
            batch.seq_id[row][0] = self._scratch_seq
            batch.logits[row] = True
        return missing

    def _free_cells(self) -> int:
        """KV cells no sequence holds (each sequence holds one contiguous range of positions)."""
        used = 0
        for seq in range(self._context_seqs):
            top = ll.llama_memory_seq_pos_max(self._mem, seq)
            if top >= 0:
                used += top - ll.llama_memory_seq_pos_min(self._mem, seq) + 1
        return self.n_ctx - used

    def _argmax(self, idx: int) -> int:
        """llama.cpp's greedy pick (the first highest logit) without its sampler.

        A sampler call copies all n_vocab logits into a candidate array before
        choosing; with Gemma 3's 262,144-token vocabulary that is about 0.9 ms
        per sequence per step here, against about 0.1 ms for this argmax, and a
        step of 8 sequences takes about 50 ms.
        """
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
        return int(logits.argmax())

    def _sample_constrained(self, key: int, idx: int) -> int:
        """Sample under a grammar, checking the grammar on the chain's pick only.

        A grammar sampler placed in the chain tests every one of the
        vocabulary's tokens (262,144 for Gemma 3) against the grammar at each
        step. The chain's own pick is almost always allowed, so it is tested
        alone first; only when the grammar refuses it are all candidates
        constrained and the chain run again on what is left (llama.cpp's own
        server samples this way). The chain and the grammar then both learn
        the token.
        """
        chain, grammar = self._samplers[key], self._grammars[key]
        logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(self._ctx, idx), shape=(self._n_vocab,))
        token = self._apply(chain, logits)
        one = np.zeros(1, dtype=_TOKEN_DATA)
        one["id"], one["logit"] = token, logits[token]
        if not np.isfinite(self._apply_raw(grammar, one)["logit"][0]):
            candidates = self._fill_candidates(logits)
            self._apply_raw(grammar, candidates)
            token = self._apply(chain, candidates["logit"])
        ll.llama_sampler_accept(grammar, token)
        ll.llama_sampler_accept(chain, token)
        return token

    def _fill_candidates(self, logits: np.ndarray) -> np.ndarray:
        candidates = self._candidates
        candidates["id"] = np.arange(len(candidates), dtype=np.int32)
        candidates["logit"] = logits
        candidates["p"] = 0.0
        return candidates

    def _apply(self, sampler: ll.llama_sampler_p, logits: np.ndarray) -> int:
        """The token ``sampler`` selects over ``logits`` (one per token id), without accepting it."""
        candidates = self._fill_candidates(logits)
        array = self._apply_raw(sampler, candidates, want_selected=True)
        return int(array["id"][0])

    @staticmethod
    def _apply_raw(sampler: ll.llama_sampler_p, candidates: np.ndarray, want_selected: bool = False) -> np.ndarray:
        """Runs ``sampler`` over ``candidates`` in place; with ``want_selected``, a 1-row view of its pick."""
        data = candidates.ctypes.data_as(ctypes.POINTER(ll.llama_token_data))
        array = ll.llama_token_data_array(data=data, size=len(candidates), selected=-1, sorted=False)
        ll.llama_sampler_apply(sampler, ctypes.byref(array))
        if not want_selected:
            return candidates
        if array.selected < 0:
            raise RuntimeError("the sampler chain selected no token")
        # A chain may shrink and reorder the array (top-k sorts); ``selected`` indexes what it left.
        return candidates[array.selected: array.selected + 1]

    def _token_logprob(self, idx: int, token: int, top: int) -> TokenLogprob:
        """log softmax of the model's raw logits (before any sampler shaping) at ``token``, and the
        ``top`` likeliest tokens, most likely first (ties: the lower token id first)."""
        pointer = ll.llama_get_logits_ith(self._ctx, idx)
        logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))
        peak = float(logits.max())
        norm = peak + float(np.log(np.exp(logits - peak).sum()))
        alternatives: tuple[tuple[int, float], ...] = ()
        if top > 0:
            picked = np.argpartition(-logits, top - 1)[:top]
            ordered = sorted(picked.tolist(), key=lambda t: (-float(logits[t]), t))
            alternatives = tuple((int(t), float(logits[t]) - norm) for t in ordered)
        return TokenLogprob(float(logits[token]) - norm, alternatives)

    def take_logprobs(self) -> dict[int, TokenLogprob]:
        taken, self._logprobs = self._logprobs, {}
        return taken

    # -- KV cache ---------------------------------------------------------

    def seq_copy(self, src_seq_id: int, seq_id: int, upto: int) -> None:
        # In the unified cache the cells gain seq_id beside src_seq_id: no memory is copied.
        ll.llama_memory_seq_cp(self._mem, src_seq_id, seq_id, 0, upto)

    def seq_truncate(self, seq_id: int, keep: int) -> None:
        if not ll.llama_memory_seq_rm(self._mem, seq_id, keep, -1):
            # A partial removal can fail on caches that cannot cut a sequence;
            # removing the whole sequence always works.
            ll.llama_memory_seq_rm(self._mem, seq_id, -1, -1)
            if keep > 0:
                raise RuntimeError(f"cannot truncate sequence {seq_id} to {keep} tokens")

    def seq_save(self, seq_id: int) -> bytes:
        size = ll.llama_state_seq_get_size(self._ctx, seq_id)
        buf = (ctypes.c_uint8 * size)()
        written = ll.llama_state_seq_get_data(self._ctx, buf, size, seq_id)
        return bytes(buf[:written])

    def seq_restore(self, seq_id: int, state: bytes) -> bool:
        buf = (ctypes.c_uint8 * len(state)).from_buffer_copy(state)
        return ll.llama_state_seq_set_data(self._ctx, buf, len(state), seq_id) > 0

    def num_layers(self) -> int:
        return ll.llama_model_n_layer(self._model)

    def close(self) -> None:
        """Free the handles: after the engine thread stopped, and once no other thread is inside a call."""
        with self._shared_calls:
            for key in list(self._samplers):
                self.close_sampler(key)
            if self._ctx:
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx)
                self._ctx = None
            if self._model:
                ll.llama_model_free(self._model)
                self._model = None
