"""InferencePort on an in-process llama.cpp model (one sequence at a time).

For a single-process orchestrator and for measuring the orchestrator's own
overhead against the engine's own time to first token. The model is the
inference client's ``LocalModel`` (the node's llama.cpp integration without
its batching); the mesh's inference service (continuous batching, per-session
KV) is what production uses. llama.cpp runs on one worker thread; the event
loop only receives chunks.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from services.inference.client.local_model import LocalModel, SamplingParams
from services.orchestrator.core.events import Usage
from services.orchestrator.core.ports import GenerationChunk, GenerationRequest

_DONE = object()

# Sampling of a request that gives a temperature only: llama.cpp's completion defaults.
TOP_K = 40
TOP_P = 0.95
MIN_P = 0.05


def sampling(request: GenerationRequest) -> SamplingParams:
    return SamplingParams(temperature=request.temperature, top_k=1 if request.temperature == 0 else TOP_K,
                          top_p=TOP_P, min_p=MIN_P, seed=request.seed if request.seed is not None else 0,
                          max_tokens=request.max_tokens, stop=tuple(request.stop), grammar=request.grammar)


class LocalLlamaInference:
    def __init__(self, model_path: Path | str, *, n_ctx: int = 2048, n_threads: int = 2) -> None:
        self._model = LocalModel(model_path, n_ctx=n_ctx, n_threads=n_threads)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._model.close()

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]:
        return self._model.tokenize(text, add_special)

    async def context_size(self, model: str = "") -> int:
        return self._model.n_ctx

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work() -> None:
            try:
                for delta in self._model.generate(request.prompt_tokens, sampling(request), stop.is_set):
                    if delta.text:
                        loop.call_soon_threadsafe(queue.put_nowait, GenerationChunk(text=delta.text))
                    if delta.usage is not None and delta.finish_reason is not None:
                        u = delta.usage
                        usage = Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                                      generated_tokens=u.generated_tokens, num_model_calls=1)
                        loop.call_soon_threadsafe(queue.put_nowait, GenerationChunk(
                            text="", finish_reason=delta.finish_reason.value, usage=usage, ttft_ms=u.ttft_ms))
            except BaseException as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
                return
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        future = loop.run_in_executor(self._executor, work)
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            await asyncio.shield(future)
