"""Request merging on the real model: eight identical greedy requests, one decode, one answer."""
from __future__ import annotations

import asyncio
import math

import pytest

from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.core.engine import Engine
from services.inference.core.front import GenerationFront
from services.inference.core.observer import EngineObserver
from services.inference.core.types import GenerateSpec, SamplingParams

pytestmark = pytest.mark.model


class FinishCounter(EngineObserver):
    def __init__(self) -> None:
        self.num_finished = 0

    def on_finish(self, usage, reason) -> None:
        self.num_finished += 1


async def text_of(stream) -> str:
    return "".join([delta.text async for delta in stream])


async def test_eight_identical_greedy_requests_decode_once_and_match_a_lone_run(model_path):
    backend = LlamaBackend(model_path, n_ctx=512, n_seq_max=2, n_batch=128, n_threads=2)
    finishes = FinishCounter()
    engine = Engine(backend, observer=finishes)
    engine.start()
    try:
        spec = GenerateSpec(prompt="The capital of France is", sampling=SamplingParams(max_tokens=8))
        front = GenerationFront(engine, backend.model_name)
        texts = await asyncio.gather(*(text_of(front.submit(spec)) for _ in range(8)))
        assert finishes.num_finished == 1
        assert len(set(texts)) == 1 and texts[0].strip()
        # Without merging the same request decodes on its own and gives the same greedy answer.
        alone = await text_of(GenerationFront(engine, backend.model_name, merge=False).submit(spec))
        assert alone == texts[0] and finishes.num_finished == 2
    finally:
        engine.stop()
        backend.close()


async def test_log_probabilities_of_greedy_tokens_come_from_the_model(model_path):
    backend = LlamaBackend(model_path, n_ctx=256, n_seq_max=1, n_batch=64, n_threads=2)
    engine = Engine(backend)
    engine.start()
    try:
        spec = GenerateSpec(prompt="The capital of France is", sampling=SamplingParams(max_tokens=6, logprobs=True))
        deltas = [delta async for delta in engine.submit(spec)]
        logprobs = [lp for d in deltas for lp in d.logprobs]
        assert len(logprobs) == sum(len(d.token_ids) for d in deltas) == 6
        # Greedy picks the most likely token, so none can be less likely than uniform over the vocabulary.
        uniform = -math.log(backend.vocab_size())
        assert all(uniform < lp <= 0.0 for lp in logprobs), logprobs
    finally:
        engine.stop()
        backend.close()
