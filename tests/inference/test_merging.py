"""Request merging and the response cache in front of a synthetic engine."""
from __future__ import annotations

import asyncio
import threading

import pytest

from services.common.errors import InvalidArgument, Unavailable
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.engine import Engine, EngineConfig
from services.inference.core.front import GenerationFront
from services.inference.core.observer import EconomicsObserver, EngineObserver
from services.inference.core.response_cache import ResponseCache
from services.inference.core.types import FinishReason, GenerateSpec, Priority, SamplingParams


class FinishCounter(EngineObserver):
    """Counts engine requests that ended: one per decode the engine ran."""

    def __init__(self) -> None:
        self.reasons: list[FinishReason] = []

    def on_finish(self, usage, reason) -> None:
        self.reasons.append(reason)


class EconomicsCounter(EconomicsObserver):
    def __init__(self) -> None:
        self.merged = 0
        self.lookups: list[bool] = []

    def on_merged(self) -> None:
        self.merged += 1

    def on_cache_lookup(self, hit: bool, hit_rate: float, entries: int) -> None:
        self.lookups.append(hit)


@pytest.fixture
def node():
    backend = SyntheticBackend(n_ctx=2048, n_seq_max=4, n_batch=256, tokens_per_s=400)
    finishes = FinishCounter()
    engine = Engine(backend, EngineConfig(max_queue=16), observer=finishes)
    engine.start()
    yield engine, finishes
    engine.stop()


def make_front(engine: Engine, *, cache_entries: int = 0, ttl_s: float = 60.0, merge: bool = True):
    counter = EconomicsCounter()
    cache = ResponseCache(cache_entries, ttl_s) if cache_entries else None
    return GenerationFront(engine, "synthetic", merge=merge, cache=cache, observer=counter), counter


def spec(prompt: str = "same prompt", max_tokens: int = 12, session: str = "", **sampling) -> GenerateSpec:
    return GenerateSpec(prompt=prompt, session_id=session,
                        sampling=SamplingParams(max_tokens=max_tokens, **sampling))


async def read_all(stream) -> list:
    return [delta async for delta in stream]


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_eight_identical_concurrent_requests_share_one_decode(node):
    engine, finishes = node
    front, counter = make_front(engine)
    streams = [front.submit(spec()) for _ in range(8)]
    results = await asyncio.gather(*(read_all(s) for s in streams))
    assert finishes.reasons == [FinishReason.LENGTH]  # the engine ran exactly one request
    assert counter.merged == 7
    assert all(tokens_of(r) == tokens_of(results[0]) and len(tokens_of(r)) == 12 for r in results)
    assert [r[-1].merged for r in results].count(True) == 7
    assert all(r[-1].usage.generated_tokens == 12 for r in results)
    assert front.num_in_flight == 0


async def test_late_joiner_receives_the_whole_stream_from_the_start(node):
    engine, finishes = node
    front, _ = make_front(engine)
    leader = front.submit(spec(max_tokens=40))
    early = [await leader.__aiter__().__anext__() for _ in range(5)]
    follower = front.submit(spec(max_tokens=40))
    rest, followed = await asyncio.gather(read_all(leader), read_all(follower))
    assert tokens_of(followed) == tokens_of(early + rest)
    assert len(tokens_of(followed)) == 40
    assert len(finishes.reasons) == 1


async def test_cancelling_one_waiter_leaves_the_others_running(node):
    engine, finishes = node
    front, _ = make_front(engine)
    streams = [front.submit(spec(max_tokens=30)) for _ in range(3)]
    quitter = streams[0].__aiter__()
    await quitter.__anext__()
    streams[0].cancel()
    survivors = await asyncio.gather(read_all(streams[1]), read_all(streams[2]))
    assert all(r[-1].finish_reason is FinishReason.LENGTH and len(tokens_of(r)) == 30 for r in survivors)
    assert finishes.reasons == [FinishReason.LENGTH]


async def test_last_waiter_leaving_cancels_the_decode(node):
    engine, finishes = node
    front, _ = make_front(engine)
    streams = [front.submit(spec(max_tokens=5000)) for _ in range(2)]
    for stream in streams:
        await stream.__aiter__().__anext__()
        stream.cancel()
    for _ in range(100):
        if finishes.reasons:
            break
        await asyncio.sleep(0.01)
    assert finishes.reasons == [FinishReason.CANCELLED]
    # A new identical request starts its own decode instead of joining the cancelled one.
    fresh = await read_all(front.submit(spec(max_tokens=5000 - 4990)))
    assert fresh[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("unshared", [
    spec(temperature=0.8),  # random seed: two answers may differ
    spec(session="s1"),  # must extend its own session's cache
])
async def test_non_deterministic_or_session_requests_are_not_merged(node, unshared):
    engine, finishes = node
    front, counter = make_front(engine, cache_entries=8)
    await asyncio.gather(read_all(front.submit(unshared)), read_all(front.submit(unshared)))
    assert len(finishes.reasons) == 2 and counter.merged == 0 and counter.lookups == []


async def test_seeded_sampling_is_merged(node):
    engine, finishes = node
    front, counter = make_front(engine)
    seeded = spec(temperature=0.8, seed=7)
    await asyncio.gather(read_all(front.submit(seeded)), read_all(front.submit(seeded)))
    assert len(finishes.reasons) == 1 and counter.merged == 1


async def test_cached_answer_returns_without_touching_the_engine(node):
    engine, finishes = node
    front, counter = make_front(engine, cache_entries=8)
    first = await read_all(front.submit(spec()))
    decode_calls = engine.backend.decode_count
    second = await read_all(front.submit(spec()))
    assert engine.backend.decode_count == decode_calls and len(finishes.reasons) == 1
    assert tokens_of(second) == tokens_of(first)
    assert all(d.cached for d in second) and not any(d.cached for d in first)
    assert second[-1].usage.cached_tokens == second[-1].usage.prompt_tokens
    assert counter.lookups == [False, True]
    # A different request, or one asking to skip the cache, decodes again.
    await read_all(front.submit(spec(max_tokens=11)))
    await read_all(front.submit(spec(), use_cache=False))
    assert len(finishes.reasons) == 3


async def test_expired_or_cancelled_answers_are_not_served_from_cache(node):
    engine, finishes = node
    front, _ = make_front(engine, cache_entries=8, ttl_s=0.05)
    await read_all(front.submit(spec()))
    await asyncio.sleep(0.08)
    again = await read_all(front.submit(spec()))
    assert not again[-1].cached and len(finishes.reasons) == 2
    stream = front.submit(spec("cancelled", max_tokens=5000))
    await stream.__aiter__().__anext__()
    stream.cancel()
    for _ in range(100):
        if len(finishes.reasons) == 3:
            break
        await asyncio.sleep(0.01)
    assert finishes.reasons[-1] is FinishReason.CANCELLED
    assert not (await read_all(front.submit(spec("cancelled", max_tokens=3))))[-1].cached


async def test_bad_request_fails_at_submission_and_is_not_merged(node):
    engine, _ = node
    front, _ = make_front(engine)
    with pytest.raises(InvalidArgument) as caught:
        front.submit(spec(max_tokens=0))
    assert caught.value.field == "sampling.max_tokens"
    assert front.num_in_flight == 0


def make_semantic_front(engine: Engine, threshold: float = 0.8):
    from services.inference.core.semantic_cache import HashingEmbedder, SemanticCache

    counter = EconomicsCounter()
    semantic = SemanticCache(HashingEmbedder(), threshold=threshold, max_entries=8, ttl_s=60)
    return GenerationFront(engine, "synthetic", semantic=semantic, observer=counter), counter


async def test_semantic_cache_answers_a_similar_prompt_only_when_asked(node):
    engine, finishes = node
    front, _ = make_semantic_front(engine)
    first = await read_all(await front.open(spec("What is the capital of France?"), semantic=True))
    similar = await read_all(await front.open(spec("what's the capital of France"), semantic=True))
    assert len(finishes.reasons) == 1 and all(d.cached for d in similar)
    assert tokens_of(similar) == tokens_of(first)
    # Not opted in, unrelated, or different sampling: a fresh decode.
    await read_all(await front.open(spec("what's the capital of France")))
    await read_all(await front.open(spec("How do bees make honey?"), semantic=True))
    await read_all(await front.open(spec("what's the capital of France", max_tokens=5), semantic=True))
    assert len(finishes.reasons) == 4


async def test_semantic_cache_skips_conversations_and_random_sampling(node):
    engine, finishes = node
    front, _ = make_semantic_front(engine)
    turns = "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\nhello<end_of_turn>\n<start_of_turn>user\nbye"
    for _ in range(2):
        await read_all(await front.open(spec(turns), semantic=True))
        await read_all(await front.open(spec("capital of France", temperature=0.7), semantic=True))
    assert len(finishes.reasons) == 4 and len(front.semantic) == 0


class ThreadRecordingEmbedder:
    """A lexical embedder that notes the thread each embedding ran on."""

    def __init__(self, runs_model: bool) -> None:
        from services.inference.core.semantic_cache import HashingEmbedder

        self.runs_model = runs_model
        self._inner = HashingEmbedder()
        self.threads: list[str] = []

    def embed(self, text: str):
        self.threads.append(threading.current_thread().name)
        return self._inner.embed(text)


@pytest.mark.parametrize("runs_model", [True, False])
async def test_a_model_embedder_runs_on_the_engine_thread_and_a_lexical_one_on_a_worker(node, runs_model):
    from services.inference.core.semantic_cache import SemanticCache

    engine, _ = node
    embedder = ThreadRecordingEmbedder(runs_model)
    front = GenerationFront(engine, "synthetic", semantic=SemanticCache(embedder, 0.8, 8, 60.0),
                            run_model=engine.call)
    await read_all(await front.open(spec("What is the capital of France?"), semantic=True))
    await read_all(await front.open(spec("what's the capital of France"), semantic=True))
    assert len(embedder.threads) == 2
    on_engine = [name == "llmesh-engine-0" for name in embedder.threads]
    assert on_engine == [runs_model, runs_model]


async def test_a_stopped_engine_refuses_work_for_its_thread(node):
    engine, _ = node
    engine.stop()
    with pytest.raises(Unavailable):
        await engine.call(lambda: None)


async def test_an_interactive_request_joining_a_queued_batch_decode_lifts_its_class():
    backend = SyntheticBackend(n_ctx=2048, n_seq_max=1, n_batch=256, tokens_per_s=400)
    engine = Engine(backend, EngineConfig(max_queue=16))
    engine.start()
    try:
        front, _ = make_front(engine)
        hog = front.submit(spec("hog", max_tokens=5000))
        await hog.__aiter__().__anext__()  # holds the only sequence
        batch = front.submit(GenerateSpec(prompt="shared", priority=Priority.BATCH,
                                          sampling=SamplingParams(max_tokens=10)))
        normal = front.submit(spec("normal", max_tokens=10))

        def waiting() -> list[tuple[str, Priority]]:
            return [(r.spec.prompt, r.spec.priority) for r in engine.scheduler.waiting]

        # engine.call runs on the engine thread after everything posted before it (the adds, the promotion).
        # Both wait: batch first in arrival, normal first in class.
        assert await engine.call(waiting) == [("shared", Priority.BATCH), ("normal", Priority.NORMAL)]
        interactive = front.submit(GenerateSpec(prompt="shared", priority=Priority.INTERACTIVE,
                                                sampling=SamplingParams(max_tokens=10)))
        # The interactive request joined the queued batch decode and lifted its class.
        assert await engine.call(waiting) == [("shared", Priority.INTERACTIVE), ("normal", Priority.NORMAL)]
        hog.cancel()
        order: list[str] = []

        async def finish(name: str, stream) -> None:
            await read_all(stream)
            order.append(name)

        await asyncio.gather(finish("shared", interactive), finish("normal", normal), read_all(batch))
        assert order == ["shared", "normal"]
    finally:
        engine.stop()
