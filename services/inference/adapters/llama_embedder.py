"""Text embeddings from the node's own model: for the semantic cache and the Embed RPC.

A causal language model's mean-pooled hidden states score almost every pair of
prompts as similar. Asking the model to sum the prompt up in one word and
taking the hidden state of the last token (pooling LAST) separates far
better: on Gemma 3 270M, paraphrases scored 0.80-0.93 and unrelated prompts
0.40-0.57 in our checks (docs/economics.md), against 0.75-0.92 and 0.55-0.83
for mean pooling.

The embedder has a llama.cpp context of its own (one sequence, embeddings on)
over the backend's loaded weights, so it never touches the generation
context's KV cache; calls are serialised by a lock. The context is created
on first use, so a node that never embeds never pays for it. The node runs
the calls on the engine thread between decode steps
(``GenerationFront(run_model=...)``, ``EmbeddingRunner``), so one thread
drives all of the model's compute. Each text is one decode of its own: its
vector never depends on what else was embedded with it.
"""
from __future__ import annotations

import threading
from collections.abc import Sequence

import llama_cpp as ll
import numpy as np
import numpy.typing as npt

from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.adapters.llama_model import create_context, put_tokens
from services.inference.core.embedding import EmbedInput

PROMPT = 'This sentence : "{text}" means in one word:"'


class LlamaEmbedder:
    runs_model = True

    def __init__(self, backend: LlamaBackend, *, n_ctx: int = 512, n_threads: int = 0) -> None:
        self._backend = backend
        self._n_threads = n_threads
        self.n_ctx = n_ctx
        self.dim = ll.llama_model_n_embd(backend.llama_model)
        # One input fills at most the context; a batch is that many tokens, decoded input by input.
        self.max_input_tokens = self.max_batch_tokens = n_ctx
        # Both None until first use, and again once closed.
        self._ctx: ll.llama_context_p | None = None
        self._batch: ll.llama_batch | None = None
        self._closed = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        """Whether the embedding context exists (it is created on first use)."""
        return self._ctx is not None

    def prepare(self, text: str) -> EmbedInput:
        return EmbedInput(text, tuple(self._backend.tokenize(PROMPT.format(text=text), True, False)))

    def embed(self, text: str) -> npt.NDArray[np.float32]:
        """The semantic cache's embedding: a prompt longer than the context keeps its head token and tail."""
        tokens = self.prepare(text).tokens
        if len(tokens) > self.n_ctx:
            # Keep the instruction's tail, which the last token's state depends on most.
            tokens = tokens[:1] + tokens[-(self.n_ctx - 1):]
        return self.embed_batch([EmbedInput(text, tokens)])[0]

    def embed_batch(self, inputs: Sequence[EmbedInput]) -> list[npt.NDArray[np.float32]]:
        for item in inputs:
            if not 0 < len(item.tokens) <= self.n_ctx:
                raise ValueError(f"an input of {len(item.tokens)} tokens does not fit {self.n_ctx}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the embedder is closed")
            ctx, batch = self._open()
            return [self._decode(ctx, batch, item.tokens) for item in inputs]

    def _open(self) -> tuple[ll.llama_context_p, ll.llama_batch]:
        if self._ctx is None or self._batch is None:
            self._ctx = create_context(self._backend.llama_model, n_ctx=self.n_ctx, n_batch=self.n_ctx,
                                       n_seq_max=1, n_threads=self._n_threads, embeddings=True,
                                       what="embedding context")
            self._batch = ll.llama_batch_init(self.n_ctx, 0, 1)
        return self._ctx, self._batch

    def _decode(self, ctx: ll.llama_context_p, batch: ll.llama_batch,
                tokens: Sequence[int]) -> npt.NDArray[np.float32]:
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        batch.n_tokens = put_tokens(batch, 0, tokens, 0, 0, logits_last=True)
        rc = ll.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with {rc} while embedding")
        pointer = ll.llama_get_embeddings_seq(ctx, 0)
        if not pointer:
            raise RuntimeError("llama.cpp returned no embedding")
        return np.ctypeslib.as_array(pointer, shape=(self.dim,)).copy()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._batch is not None:
                ll.llama_batch_free(self._batch)
                self._batch = None
            if self._ctx is not None:
                ll.llama_free(self._ctx)
                self._ctx = None
