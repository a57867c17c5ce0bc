"""InferencePort on an in-process llama.cpp model (one sequence at a time).

For a single-process orchestrator and for measuring the orchestrator's own
overhead against the engine's own time to first token. The mesh's inference
service (continuous batching, per-session KV) is what production uses.
llama.cpp runs on one worker thread; the event loop only receives chunks.
"""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import AsyncIterator

from services.orchestrator.core.events import Usage
from services.orchestrator.core.ports import GenerationChunk, GenerationRequest

_DONE = object()


class LocalLlamaInference:
    def __init__(self, model_path: Path | str, *, n_ctx: int = 2048, n_threads: int = 2) -> None:
        import llama_cpp  # imported here: only this adapter needs the engine

        self._llama_cpp = llama_cpp
        self._llm = llama_cpp.Llama(model_path=str(model_path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llama")
        self._grammars: dict[str, object] = {}

    def close(self) -> None:
        self._executor.shutdown(wait=True)

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode(), add_bos=add_special, special=True)

    async def context_size(self, model: str = "") -> int:
        return self._llm.n_ctx()

    def _grammar(self, text: str):
        if text and text not in self._grammars:
            self._grammars[text] = self._llama_cpp.LlamaGrammar.from_string(text, verbose=False)
        return self._grammars.get(text)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()
        grammar = self._grammar(request.grammar)

        def work() -> None:
            started = time.perf_counter()
            ttft_ms = 0.0
            num_generated = 0
            finish = "length"
            try:
                stream = self._llm.create_completion(
                    prompt=list(request.prompt_tokens), max_tokens=request.max_tokens,
                    temperature=request.temperature, top_k=1 if request.temperature == 0 else 40,
                    seed=request.seed if request.seed is not None else 0, grammar=grammar,
                    stop=list(request.stop) or None, stream=True)
                for part in stream:
                    if stop.is_set():
                        finish = "cancelled"
                        break
                    choice = part["choices"][0]
                    if num_generated == 0:
                        ttft_ms = (time.perf_counter() - started) * 1000
                    num_generated += 1
                    if choice.get("text"):
                        loop.call_soon_threadsafe(queue.put_nowait, GenerationChunk(text=choice["text"]))
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
            except BaseException as exc:  # noqa: BLE001 - handed to the event loop side
                loop.call_soon_threadsafe(queue.put_nowait, exc)
                return
            usage = Usage(prompt_tokens=len(request.prompt_tokens), generated_tokens=num_generated,
                          num_model_calls=1)
            loop.call_soon_threadsafe(queue.put_nowait, GenerationChunk(
                text="", finish_reason=finish, usage=usage, ttft_ms=ttft_ms))
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
