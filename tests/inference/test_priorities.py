"""Priority classes: admission order, per-class caps and queues, bounded wait, TTFT under a batch flood."""
from __future__ import annotations

import pytest

from services.common.errors import ResourceExhausted
from services.inference.adapters.synthetic_backend import SyntheticBackend
from services.inference.core.budget import PrefillBudget
from services.inference.core.engine import Engine, EngineConfig, execute
from services.inference.core.priorities import ClassLimit, PriorityPolicy, default_policy
from services.inference.core.scheduler import Request, Scheduler
from services.inference.core.types import GenerateSpec, Priority, SamplingParams, next_key
from tests.support.waiting import wait_until

BATCH, NORMAL, INTERACTIVE = Priority.BATCH, Priority.NORMAL, Priority.INTERACTIVE


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(policy: PriorityPolicy, n_seq: int = 2) -> tuple[Scheduler, SyntheticBackend, Clock]:
    backend = SyntheticBackend(n_ctx=1024, n_seq_max=n_seq, n_batch=128, tokens_per_s=0)
    clock = Clock()
    return Scheduler(backend, n_seq, 1024, 128, clock=clock, priorities=policy), backend, clock


def add(scheduler: Scheduler, priority: Priority, arrival: float, max_tokens: int = 1000) -> Request:
    spec = GenerateSpec(prompt=f"{priority.name} at {arrival}", priority=priority,
                        sampling=SamplingParams(max_tokens=max_tokens))
    request = Request(key=next_key(), spec=spec, sink=lambda delta: None, arrival=arrival)
    scheduler.add(request)
    return request


def step(scheduler: Scheduler, backend: SyntheticBackend) -> None:
    plan = scheduler.plan()
    scheduler.apply(plan, execute(backend, plan))


def running_classes(scheduler: Scheduler) -> list[Priority]:
    return sorted(r.spec.priority for r in scheduler.running)


def test_batch_flood_leaves_a_reserved_sequence_for_interactive():
    scheduler, backend, clock = make_scheduler(default_policy(2, batch_reserved_sequences=1))
    for i in range(5):
        add(scheduler, BATCH, arrival=i * 0.001)
    step(scheduler, backend)
    assert running_classes(scheduler) == [BATCH]  # batch is capped at one of two sequences
    clock.now = 1.0
    add(scheduler, INTERACTIVE, arrival=1.0)
    step(scheduler, backend)
    assert running_classes(scheduler) == [INTERACTIVE, BATCH]


def test_interactive_is_admitted_before_earlier_normal_and_batch():
    scheduler, backend, _ = make_scheduler(PriorityPolicy(), n_seq=1)
    batch = add(scheduler, BATCH, arrival=0.0)
    normal = add(scheduler, NORMAL, arrival=0.1)
    interactive = add(scheduler, INTERACTIVE, arrival=0.2)
    step(scheduler, backend)
    assert scheduler.running == [interactive]
    scheduler.cancel(interactive.key)
    step(scheduler, backend)
    assert scheduler.running == [normal] and scheduler.waiting == [batch]


def test_a_request_that_waited_past_its_bound_goes_ahead_of_newer_interactive():
    policy = PriorityPolicy({BATCH: ClassLimit(max_wait_ms=500)})
    scheduler, backend, clock = make_scheduler(policy, n_seq=1)
    running = add(scheduler, INTERACTIVE, arrival=0.0)
    step(scheduler, backend)
    batch = add(scheduler, BATCH, arrival=0.0)
    add(scheduler, INTERACTIVE, arrival=0.1)
    clock.now = 0.2  # not yet past the bound: interactive first
    assert policy.admission_order(scheduler.waiting, clock.now)[0] is not batch
    clock.now = 0.6  # past it: the batch request ranks with interactive, by arrival
    scheduler.cancel(running.key)
    step(scheduler, backend)
    assert scheduler.running == [batch]


async def test_class_queue_limit_refuses_that_class_only():
    policy = default_policy(1, batch_reserved_sequences=0, max_waiting={BATCH: 2})
    backend = SyntheticBackend(n_ctx=1024, n_seq_max=1, n_batch=128, tokens_per_s=200)
    engine = Engine(backend, EngineConfig(max_queue=16, priorities=policy))
    engine.start()
    try:
        spec = GenerateSpec(prompt="long", priority=BATCH, sampling=SamplingParams(max_tokens=5000))
        handles = [engine.submit(spec)]
        # The first one takes the only sequence; the call after it runs once that step has ended, so the
        # engine's queue counts (read by submit) say so too.
        assert await wait_until(lambda: engine.load().num_running == 1)
        await engine.call(lambda: None)
        handles += [engine.submit(spec) for _ in range(2)]
        with pytest.raises(ResourceExhausted) as caught:
            engine.submit(spec)
        assert caught.value.reason == "CLASS_QUEUE_FULL"
        handles.append(engine.submit(GenerateSpec(prompt="hi", priority=INTERACTIVE,
                                                  sampling=SamplingParams(max_tokens=1))))
        for handle in handles:
            handle.cancel()
    finally:
        engine.stop()


def start_flood(policy: PriorityPolicy, num_batch: int) -> tuple[Engine, list]:
    """An engine with four sequences and ``num_batch`` batch requests far too long to end during a test."""
    backend = SyntheticBackend(n_ctx=8192, n_seq_max=4, n_batch=256, tokens_per_s=100, ttft_ms=60)
    engine = Engine(backend, EngineConfig(max_queue=64, priorities=policy))
    engine.start()
    flood = [engine.submit(GenerateSpec(prompt=f"batch {i}", priority=BATCH,
                                        sampling=SamplingParams(max_tokens=5000))) for i in range(num_batch)]
    return engine, flood


async def flood_holds(engine: Engine, running: int, waiting: int) -> bool:
    return await wait_until(lambda: (engine.load().num_running, engine.load().queue_depth) == (running, waiting),
                            timeout_s=10)


def interactive() -> GenerateSpec:
    return GenerateSpec(prompt="interactive", priority=INTERACTIVE, sampling=SamplingParams(max_tokens=2))


async def test_interactive_is_served_on_the_reserved_sequence_while_a_batch_flood_is_queued():
    engine, flood = start_flood(default_policy(4), num_batch=20)
    try:
        assert await flood_holds(engine, running=3, waiting=17), engine.load()  # batch may hold 3 of 4
        deltas = [delta async for delta in engine.submit(interactive())]
        assert deltas[-1].usage is not None and deltas[-1].usage.generated_tokens == 2
        # No batch request ended or left its sequence meanwhile: the interactive one ran beside them.
        scheduler = engine.scheduler
        assert await engine.call(lambda: (len(scheduler.running), len(scheduler.waiting))) == (3, 17)
    finally:
        for request in flood:
            request.cancel()
        engine.stop()


async def test_without_a_reserved_sequence_interactive_waits_for_a_batch_request_to_end():
    engine, flood = start_flood(default_policy(4, batch_reserved_sequences=0), num_batch=20)
    try:
        assert await flood_holds(engine, running=4, waiting=16), engine.load()
        handle = engine.submit(interactive())

        def interactive_state() -> str:
            scheduler = engine.scheduler
            return ("waiting" if any(r.key == handle.key for r in scheduler.waiting)
                    else "running" if any(r.key == handle.key for r in scheduler.running) else "gone")

        # engine.call runs between steps, after what was posted before it: the first call comes after the
        # add, the second after a step that planned admissions with the interactive request waiting.
        assert await engine.call(interactive_state) == "waiting"
        assert await engine.call(interactive_state) == "waiting"
        flood[0].cancel()  # a batch request ends: its sequence goes to interactive, ahead of the queued batch
        deltas = [delta async for delta in handle]
        assert deltas[-1].usage is not None and deltas[-1].usage.generated_tokens == 2
    finally:
        for request in flood:
            request.cancel()
        engine.stop()


class TightBudget(PrefillBudget):
    """Fair prefill that allows only 4 prompt tokens per step while streams decode."""

    def tokens_for_step(self, num_decode: int) -> int:
        return 4 if num_decode else self.max_tokens


@pytest.mark.parametrize("priority,expected_chunk", [(INTERACTIVE, 41), (NORMAL, 4)])
def test_interactive_prompt_is_not_throttled_to_protect_batch_streams(priority, expected_chunk):
    backend = SyntheticBackend(n_ctx=1024, n_seq_max=3, n_batch=128, tokens_per_s=0)
    scheduler = Scheduler(backend, 3, 1024, 128, budget=TightBudget(max_tokens=128))
    add(scheduler, BATCH, arrival=0.0)
    step(scheduler, backend)
    step(scheduler, backend)  # the batch request is now decoding
    spec = GenerateSpec(prompt="x" * 40, priority=priority, sampling=SamplingParams(max_tokens=3))
    scheduler.add(Request(key=next_key(), spec=spec, sink=lambda delta: None, arrival=1.0))
    plan = scheduler.plan()
    prefill = [e for e in plan.entries if len(e.tokens) > 1 or e.start_pos == 0]
    assert [len(e.tokens) for e in prefill] == [expected_chunk]
