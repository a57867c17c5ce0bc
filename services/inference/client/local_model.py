"""The model in this process: the inference node's llama.cpp integration, one request at a time.

For a single-process deployment or a measurement that wants the model without
a node (the orchestrator's in-process model): the same loading, context,
tokenizer and samplers as a node (``adapters/llama_model.py``,
``LlamaBackend``), with one sequence and no continuous batching or network
hop. Blocking: call it from one worker thread.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from services.inference.core.one_sequence import OneSequence
from services.inference.core.types import Delta, SamplingParams

__all__ = ["Delta", "LocalModel", "SamplingParams"]


class LocalModel:
    def __init__(self, model_path: Path | str, *, n_ctx: int = 2048, n_batch: int = 512, n_threads: int = 0) -> None:
        # Imported here: only a process that runs the model loads llama.cpp.
        from services.inference.adapters.llama_backend import LlamaBackend

        self.backend = LlamaBackend(model_path, n_ctx=n_ctx, n_seq_max=1, n_batch=n_batch, n_threads=n_threads)
        self._sequence = OneSequence(self.backend)

    @property
    def n_ctx(self) -> int:
        return self.backend.n_ctx

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self.backend.tokenize(text, add_special, True)

    def generate(self, prompt_tokens: Sequence[int], params: SamplingParams,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Delta]:
        """Deltas of text; the last carries finish_reason and usage (see ``OneSequence``)."""
        return self._sequence.generate(prompt_tokens, params, cancelled)

    def close(self) -> None:
        self.backend.close()
