"""The engine: one thread that owns the model and loops plan -> decode -> apply.

The asyncio side never waits on the model: ``submit`` hands a request to the
thread through an inbox and gets a ``RequestHandle`` whose deltas arrive on
an ``asyncio.Queue`` via ``call_soon_threadsafe``. The thread sleeps on a
condition variable when there is nothing to do.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable, require
from services.inference.core.backend import Backend
from services.inference.core.budget import PrefillBudget
from services.inference.core.kv_slots import DEFAULT_BLOCK_TOKENS
from services.inference.core.observer import EngineObserver
from services.inference.core.plan import OpKind, StepPlan, StepResult
from services.inference.core.prefixes import DEFAULT_BLOCK_CHARS
from services.inference.core.priorities import PriorityPolicy, count_by_class
from services.inference.core.scheduler import Request, Scheduler
from services.inference.core.types import (
    MAX_CHOICES,
    MAX_TOP_LOGPROBS,
    Delta,
    FinishReason,
    GenerateSpec,
    LoadReport,
    Priority,
    next_key,
)

log = logging.getLogger("llmesh.inference.engine")

# Window over which GetLoad's tokens_per_second is measured.
RATE_WINDOW_S = 5.0


@dataclass(frozen=True)
class EngineConfig:
    #: Requests waiting for a sequence before new ones get RESOURCE_EXHAUSTED.
    max_queue: int = 64
    #: Allowed step time as a multiple of a pure decode step while prefilling.
    prefill_slowdown: float = 1.8
    #: Absolute step-time target in ms while prefilling (0: use the slowdown).
    itl_target_ms: float = 0.0
    #: Prompt tokens per step even when the target cannot be met.
    prefill_min_tokens: int = 4
    #: Bytes of evicted session state kept in memory for restores.
    saved_state_max_bytes: int = 256 << 20
    #: Admission order and per-class limits; None admits by priority then arrival, no caps.
    priorities: PriorityPolicy | None = None
    #: When a request reaches an idle engine, wait this long for others to start with it (0: never).
    admission_window_ms: float = 5.0
    #: Tokens per block of the prefix index; a new sequence shares another's cells from one block on (0: never).
    prefix_block_tokens: int = DEFAULT_BLOCK_TOKENS
    #: Characters per text block, and most hashes, of the prefix summary GetLoad reports to routers.
    prefix_block_chars: int = DEFAULT_BLOCK_CHARS
    prefix_summary_max: int = 256


def execute(backend: Backend, plan: StepPlan) -> StepResult:
    """Run a plan's cache operations, then its one decode call."""
    result = StepResult()
    for op in plan.ops:
        if op.kind is OpKind.OPEN_SAMPLER:
            assert op.params is not None
            backend.open_sampler(op.key, op.params)
        elif op.kind is OpKind.CLOSE_SAMPLER:
            backend.close_sampler(op.key)
        elif op.kind is OpKind.TRUNCATE:
            backend.seq_truncate(op.seq_id, op.keep)
        elif op.kind is OpKind.SAVE:
            result.saved[op.session_id] = backend.seq_save(op.seq_id)
        elif op.kind is OpKind.RESTORE:
            result.restored[op.key] = backend.seq_restore(op.seq_id, op.state)
        elif op.kind is OpKind.COPY:
            backend.seq_copy(op.src_seq_id, op.seq_id, op.keep)
    if plan.entries:
        start = time.perf_counter()
        result.sampled = backend.decode(plan.entries)
        result.logprobs = backend.take_logprobs()
        result.decode_ms = (time.perf_counter() - start) * 1000.0
    return result


def choice_spec(spec: GenerateSpec, index: int) -> GenerateSpec:
    """Choice ``index`` of ``spec``: seed + index, so sampled choices differ and each one repeats."""
    if spec.n == 1:
        return spec
    seed = spec.sampling.seed
    if seed is None:
        seed = secrets.randbits(31)
    sampling = dataclasses.replace(spec.sampling, seed=(seed + index) % 2**32)
    return dataclasses.replace(spec, sampling=sampling, n=1)


class RequestHandle:
    """The asyncio end of one generation: iterate deltas, cancel when the client leaves.

    A request for n choices is n scheduler requests (``keys``) feeding one
    queue, each delta marked with its choice's index; it is done when every
    choice has finished.
    """

    def __init__(self, engine: Engine, key: int, num_choices: int = 1) -> None:
        self._engine = engine
        self.key = key
        self.keys = [key] + [next_key() for _ in range(num_choices - 1)]
        self.queue: asyncio.Queue[Delta] = asyncio.Queue()
        self.done = False
        self._unfinished = num_choices

    def __aiter__(self) -> RequestHandle:
        return self

    async def __anext__(self) -> Delta:
        if self.done:
            raise StopAsyncIteration
        delta = await self.queue.get()
        if delta.error is not None:
            self.done = True
            raise delta.error
        if delta.finish_reason is not None:
            self._unfinished -= 1
            self.done = self._unfinished == 0
        return delta

    def cancel(self) -> None:
        if not self.done:
            self.done = True
            for key in self.keys:
                self._engine.cancel(key)

    def promote(self, priority: Priority) -> None:
        """Queue this request in a better class if it is still waiting (a more urgent request joined it)."""
        if not self.done:
            self._engine.promote(self.key, priority)


class Engine:
    def __init__(self, backend: Backend, config: EngineConfig | None = None,
                 observer: EngineObserver | None = None, name: str = "engine-0") -> None:
        self.backend = backend
        self.config = config or EngineConfig()
        self.observer = observer or EngineObserver()
        self.name = name
        budget = PrefillBudget(slowdown=self.config.prefill_slowdown, itl_target_ms=self.config.itl_target_ms,
                               min_tokens=self.config.prefill_min_tokens, max_tokens=backend.max_batch_tokens)
        self.scheduler = Scheduler(backend, backend.n_seq_max, backend.n_ctx, backend.max_batch_tokens,
                                   budget=budget, saved_max_bytes=self.config.saved_state_max_bytes,
                                   observer=self.observer, priorities=self.config.priorities,
                                   block_tokens=self.config.prefix_block_tokens)
        self.scheduler.table.block_chars = self.config.prefix_block_chars
        self._cond = threading.Condition()
        self._inbox: list[Callable[[], None]] = []
        # Requests in the inbox not yet handed to the scheduler, and the
        # scheduler's waiting count as of the last step (both under _cond).
        self._inbox_adds = 0
        self._inbox_adds_by_class: collections.Counter[Priority] = collections.Counter()
        self._num_waiting = 0
        self._waiting_by_class: collections.Counter[Priority] = collections.Counter()
        self._num_idle_sequences = backend.n_seq_max
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._load = self._snapshot()
        self._generated: collections.deque[tuple[float, int]] = collections.deque()
        self.failed: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"llmesh-{self.name}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # -- asyncio side -------------------------------------------------------------

    def submit(self, spec: GenerateSpec, *, require_session: bool = False) -> RequestHandle:
        """Queue a generation; raises InvalidArgument or ResourceExhausted at once."""
        if self.failed is not None or self._stopping:
            raise Unavailable("the inference engine is not running", reason="ENGINE_STOPPED")
        require(bool(spec.prompt) or bool(spec.prompt_tokens), "prompt", "give a prompt or prompt_tokens")
        require(not (spec.prompt and spec.prompt_tokens), "prompt", "give either prompt or prompt_tokens, not both")
        sampling = spec.sampling
        require(sampling.max_tokens > 0, "sampling.max_tokens", "must be > 0")
        require(sampling.temperature >= 0.0, "sampling.temperature", "must be >= 0")
        require(0.0 <= sampling.top_p <= 1.0, "sampling.top_p", "must be within [0, 1]")
        require(sampling.top_k >= 0, "sampling.top_k", "must be >= 0")
        require(0.0 <= sampling.min_p <= 1.0, "sampling.min_p", "must be within [0, 1]")
        require(sampling.repeat_penalty > 0.0, "sampling.repeat_penalty", "must be > 0")
        require(0 <= sampling.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
                f"must be within [0, {MAX_TOP_LOGPROBS}]")
        require(sampling.logprobs or not sampling.top_logprobs, "top_logprobs", "needs logprobs")
        if require_session and not spec.session_id:
            raise InvalidArgument("session_id: required when the session must be cached", field="session_id")
        require(1 <= spec.n <= min(MAX_CHOICES, self.backend.n_seq_max), "n",
                f"must be within [1, {min(MAX_CHOICES, self.backend.n_seq_max)}] on this node")
        require(spec.n == 1 or not spec.session_id, "n", "several choices cannot extend one session")
        self.backend.check_sampling(sampling)
        loop = asyncio.get_running_loop()
        handle = RequestHandle(self, next_key(), spec.n)
        arrival = time.monotonic()
        requests: list[Request] = []
        for index, key in enumerate(handle.keys):
            requests.append(Request(key=key, spec=choice_spec(spec, index), sink=self._sink(loop, handle, index),
                                    arrival=arrival, require_session=require_session,
                                    parent=requests[0] if requests else None))
        with self._cond:
            # Requests still in the inbox will first take the sequences that were idle.
            queued = self._num_waiting + max(0, self._inbox_adds - self._num_idle_sequences)
            if queued >= self.config.max_queue:
                raise ResourceExhausted(
                    f"{queued} requests are already waiting on this node", reason="QUEUE_FULL",
                    retry_after_ms=250)
            class_queued = self._waiting_by_class[spec.priority] + max(
                0, self._inbox_adds_by_class[spec.priority] - self._num_idle_sequences)
            if self.scheduler.priorities.queue_full(spec.priority, {spec.priority: class_queued}):
                raise ResourceExhausted(
                    f"{class_queued} {spec.priority.name.lower()} requests are already waiting on this node",
                    reason="CLASS_QUEUE_FULL", retry_after_ms=250)
            self._inbox_adds += len(requests)
            self._inbox_adds_by_class[spec.priority] += len(requests)
            self._inbox.extend(functools.partial(self.scheduler.add, r) for r in requests)
            self._cond.notify()
        return handle

    @staticmethod
    def _sink(loop: asyncio.AbstractEventLoop, handle: RequestHandle, index: int) -> Callable[[Delta], None]:
        def sink(delta: Delta) -> None:
            try:
                loop.call_soon_threadsafe(handle.queue.put_nowait,
                                          dataclasses.replace(delta, index=index) if index else delta)
            except RuntimeError:
                pass  # the caller's event loop is gone, and the caller with it

        return sink

    def cancel(self, key: int) -> None:
        self._post(lambda: self.scheduler.cancel(key))

    def promote(self, key: int, priority: Priority) -> None:
        self._post(lambda: self.scheduler.promote(key, priority))

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine thread between steps and await its result.

        Other model work of the node (the semantic cache's embeddings) runs
        here too, so one thread drives all of llama.cpp's compute: a second
        thread would bring a second OpenMP worker team, and libgomp shortens
        every team's busy-wait once it manages more threads than there are
        CPUs, which slows each decode step (docs/inference.md).
        """
        if self.failed is not None or self._stopping:
            raise Unavailable("the inference engine is not running", reason="ENGINE_STOPPED")
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def run() -> None:
            try:
                result = fn()
                # What fn changed (a released session) shows in GetLoad before the caller hears back.
                self._load = self._snapshot()
                future.set_result(result)
            except BaseException as exc:
                future.set_exception(exc)

        self._post(run)
        return await asyncio.wrap_future(future)

    async def release_session(self, session_id: str) -> bool:
        return await self.call(lambda: self.scheduler.release_session(session_id))

    def load(self) -> LoadReport:
        return self._load

    def holds_session(self, session_id: str) -> bool:
        # Read without the engine thread: a stale answer only costs a cache miss.
        return self.scheduler.table.knows(session_id)

    def _post(self, fn: Callable[[], None]) -> None:
        with self._cond:
            self._inbox.append(fn)
            self._cond.notify()

    # -- engine thread ------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    while not self._inbox and not self.scheduler.has_work and not self._stopping:
                        self._cond.wait()
                    if self._inbox_adds and not self.scheduler.has_work:
                        self._gather_arrivals()
                    if self._stopping:
                        break
                    inbox, self._inbox = self._inbox, []
                    self._inbox_adds = 0
                    self._inbox_adds_by_class.clear()
                for fn in inbox:
                    fn()
                self.step()
        except BaseException as exc:
            log.exception("inference engine stopped on an error")
            self.failed = exc
        finally:
            self._abort_all()

    def _gather_arrivals(self) -> None:
        """Hold the first step of an idle engine for ``admission_window_ms`` (under ``_cond``).

        Requests of a burst reach the engine a few milliseconds apart. Without
        the wait the first one would start alone and, once it decodes, fair
        prefill would admit the others a few prompt tokens per step: streams
        would start and end over many steps, each running narrower than the
        burst. Nothing decodes while the engine waits, so no stream is held up.
        """
        deadline = time.monotonic() + self.config.admission_window_ms / 1000.0
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            self._cond.wait(remaining)

    def step(self) -> None:
        """One iteration: plan -> decode -> apply."""
        plan = self.scheduler.plan()
        if not plan.is_empty:
            result = execute(self.backend, plan)
            self.scheduler.apply(plan, result)
            if result.sampled:
                self._generated.append((time.monotonic(), len(result.sampled)))
        self._load = self._snapshot()
        with self._cond:
            self._num_waiting = self._load.queue_depth
            self._waiting_by_class = count_by_class(self.scheduler.waiting)
            self._num_idle_sequences = self._load.num_free_sequences
        self.observer.on_load(self._load)

    def _snapshot(self) -> LoadReport:
        table = self.scheduler.table
        now = time.monotonic()
        generated = self.__dict__.setdefault("_generated", collections.deque())
        while generated and generated[0][0] < now - RATE_WINDOW_S:
            generated.popleft()
        rate = sum(n for _, n in generated) / RATE_WINDOW_S if generated else 0.0
        return LoadReport(
            queue_depth=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_free_sequences=sum(1 for s in table.slots if s.busy_key is None),
            num_sequences=len(table.slots),
            kv_used_cells=table.used_cells,
            kv_total_cells=table.num_cells,
            tokens_per_second=rate,
            num_sessions=table.num_sessions,
            kv_cells_saved=table.held_cells - table.used_cells,
            prefix_blocks=tuple(table.prefix_summary(self.config.prefix_summary_max)),
            prefix_block_chars=table.block_chars,
        )

    def _abort_all(self) -> None:
        error = Unavailable("the inference engine stopped", reason="ENGINE_STOPPED")
        for request in [*self.scheduler.waiting, *self.scheduler.running]:
            request.sink(Delta(error=error))
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        with self._cond:
            for fn in self._inbox:
                fn()  # adds land in the scheduler; fail them too
            self._inbox = []
        for request in self.scheduler.waiting:
            request.sink(Delta(error=error))
        self.scheduler.waiting.clear()


__all__ = ["Engine", "EngineConfig", "RequestHandle", "execute", "FinishReason"]
