"""An idle engine waits briefly for a burst of requests to start together; a busy one never waits."""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest

from services.common.errors import Unavailable
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.engine import Engine, EngineConfig
from services.inference.core.types import GenerateSpec, SamplingParams


def spec(prompt: str, max_tokens: int = 4) -> GenerateSpec:
    return GenerateSpec(prompt=prompt, sampling=SamplingParams(max_tokens=max_tokens))


async def drain(handle) -> list:
    return [delta async for delta in handle]


def make_engine(window_ms: float, tokens_per_s: float = 0) -> tuple[Engine, SyntheticBackend]:
    backend = SyntheticBackend(n_ctx=2048, n_seq_max=4, n_batch=256, tokens_per_s=tokens_per_s,
                               record_decodes=True)
    engine = Engine(backend, EngineConfig(admission_window_ms=window_ms))
    engine.start()
    return engine, backend


async def test_a_burst_reaching_an_idle_engine_is_prefilled_in_one_step():
    engine, backend = make_engine(window_ms=300)
    try:
        handles = []
        for i in range(3):
            handles.append(engine.submit(spec(f"burst request {i}")))
            await asyncio.sleep(0.02)  # arrivals spread over 40 ms, well inside the window
        await asyncio.gather(*(drain(h) for h in handles))
        first = backend.decode_calls[0]
        assert len(first) == 3 and all(len(entry.tokens) > 1 for entry in first)
    finally:
        engine.stop()


async def test_a_request_joining_running_streams_does_not_wait_for_the_window():
    engine, _ = make_engine(window_ms=0, tokens_per_s=200)  # the long stream lasts ~10 s
    try:
        running = engine.submit(spec("a long stream", max_tokens=1_000_000))
        await running.__anext__()  # the engine is busy from here on
        engine.config = dataclasses.replace(engine.config, admission_window_ms=30_000)
        joined = await asyncio.wait_for(drain(engine.submit(spec("joins"))), timeout=10)
        assert joined[-1].finish_reason is not None
        running.cancel()
    finally:
        engine.stop()


class WindowSignallingEngine(Engine):
    """An engine that sets ``in_window`` as its thread starts holding an idle step for arrivals."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.in_window = threading.Event()

    def _gather_arrivals(self) -> None:
        self.in_window.set()
        super()._gather_arrivals()


async def test_stopping_during_the_window_fails_the_waiting_request_at_once():
    backend = SyntheticBackend(n_ctx=2048, n_seq_max=4, n_batch=256, tokens_per_s=0)
    engine = WindowSignallingEngine(backend, EngineConfig(admission_window_ms=30_000))
    engine.start()
    handle = engine.submit(spec("never starts"))
    assert await asyncio.to_thread(engine.in_window.wait, 10), "the engine never opened its window"
    stopper = threading.Thread(target=engine.stop)
    stopper.start()
    # Generous, and well short of the 30 s window: only a stop that cut the window short returns in time.
    stopper.join(timeout=15)
    assert not stopper.is_alive()
    with pytest.raises(Unavailable):
        await asyncio.wait_for(drain(handle), timeout=10)


def test_a_negative_window_is_refused_naming_the_setting():
    from services.common.errors import InvalidArgument
    from services.inference.config import Settings
    from services.inference.server import engine_config

    with pytest.raises(InvalidArgument) as info:
        engine_config(Settings(admission_window_ms=-1))
    assert info.value.field == "admission_window_ms"
