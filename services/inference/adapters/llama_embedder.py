"""Prompt embeddings from the node's own model, for the semantic cache.

A causal language model's mean-pooled hidden states score almost every pair of
prompts as similar. Asking the model to sum the prompt up in one word and
taking the hidden state of the last token (pooling LAST) separates far
better: on Gemma 3 270M, paraphrases scored 0.80-0.93 and unrelated prompts
0.40-0.57 in our checks (docs/economics.md), against 0.75-0.92 and 0.55-0.83
for mean pooling.

The embedder has a llama.cpp context of its own (one sequence, embeddings on)
over the backend's loaded weights, so it never touches the generation
context's KV cache; calls are serialised by a lock. The node runs them on the
engine thread between decode steps (``GenerationFront(run_model=...)``), so
one thread drives all of the model's compute.
"""
from __future__ import annotations

import threading

import llama_cpp as ll
import numpy as np
import numpy.typing as npt

from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.adapters.llama_model import create_context, put_tokens

PROMPT = 'This sentence : "{text}" means in one word:"'


class LlamaEmbedder:
    runs_model = True

    def __init__(self, backend: LlamaBackend, *, n_ctx: int = 512, n_threads: int = 0) -> None:
        self._backend = backend
        # None once closed.
        self._ctx: ll.llama_context_p | None = create_context(
            backend.llama_model, n_ctx=n_ctx, n_batch=n_ctx, n_seq_max=1, n_threads=n_threads, embeddings=True,
            what="embedding context")
        self.n_ctx = ll.llama_n_ctx(self._ctx)
        self.dim = ll.llama_model_n_embd(backend.llama_model)
        self._batch = ll.llama_batch_init(self.n_ctx, 0, 1)
        self._lock = threading.Lock()

    def embed(self, text: str) -> npt.NDArray[np.float32]:
        tokens = self._backend.tokenize(PROMPT.format(text=text), True, False)
        if len(tokens) > self.n_ctx:
            # Keep the instruction's tail, which the last token's state depends on most.
            tokens = tokens[:1] + tokens[-(self.n_ctx - 1):]
        with self._lock:
            if not self._ctx:
                raise RuntimeError("the embedder is closed")
            ll.llama_memory_clear(ll.llama_get_memory(self._ctx), True)
            batch = self._batch
            batch.n_tokens = put_tokens(batch, 0, tokens, 0, 0, logits_last=True)
            rc = ll.llama_decode(self._ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc} while embedding")
            pointer = ll.llama_get_embeddings_seq(self._ctx, 0)
            return np.ctypeslib.as_array(pointer, shape=(self.dim,)).copy()

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                ll.llama_batch_free(self._batch)
                ll.llama_free(self._ctx)
                self._ctx = None
