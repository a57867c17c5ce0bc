"""Continuous batching: which requests get a sequence, and what each step decodes.

``plan()`` admits waiting requests (reusing a session's sequence and the
longest cached prefix, restoring saved sessions, evicting idle ones), then
builds one batch: the next token of every decoding request plus prompt chunks
of prefilling requests within the fair-prefill budget. ``apply()`` takes the
sampled tokens back, streams text and finishes requests. Both run on the
engine thread; nothing here touches the model directly.
"""
from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from services.common.errors import DomainError, InvalidArgument, NotFound
from services.inference.core.budget import PrefillBudget
from services.inference.core.kv_slots import DEFAULT_BLOCK_TOKENS, Eviction, KVSlotTable, Slot
from services.inference.core.observer import EngineObserver
from services.inference.core.plan import KVOp, OpKind, StepPlan, StepResult
from services.inference.core.priorities import PriorityPolicy, count_by_class
from services.inference.core.text import StreamText, check_token_ids, common_prefix_len
from services.inference.core.types import (
    BatchEntry,
    Delta,
    FinishReason,
    GenerateSpec,
    Priority,
    TokenLogprob,
    Usage,
)


class Vocab(Protocol):
    n_ctx: int

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]: ...

    def token_piece(self, token: int) -> bytes: ...

    def is_eog(self, token: int) -> bool: ...

    def vocab_size(self) -> int: ...


class Phase(enum.Enum):
    WAITING = "waiting"
    RESTORING = "restoring"
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(eq=False)
class Request:
    key: int
    spec: GenerateSpec
    sink: Callable[[Delta], None]
    arrival: float
    require_session: bool = False
    phase: Phase = Phase.WAITING
    prompt: list[int] | None = None
    slot: Slot | None = None
    num_cached: int = 0
    num_prefilled: int = 0
    generated: list[int] = field(default_factory=list)
    first_token_at: float | None = None
    last_token_at: float | None = None
    text: StreamText | None = None
    #: Another choice of the same request, whose prefilled prompt this one copies instead of prefilling.
    parent: Request | None = None


class Admission(enum.Enum):
    ADMITTED = "admitted"
    SKIP = "skip"  # this one must wait (its session is busy); others may go
    BLOCKED = "blocked"  # no sequence or cells now; nobody behind it goes either
    FAILED = "failed"


class Scheduler:
    def __init__(
        self,
        vocab: Vocab,
        num_sequences: int,
        num_cells: int,
        max_batch_tokens: int,
        budget: PrefillBudget | None = None,
        saved_max_bytes: int = 256 << 20,
        observer: EngineObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        priorities: PriorityPolicy | None = None,
        block_tokens: int = DEFAULT_BLOCK_TOKENS,
    ) -> None:
        self.vocab = vocab
        self.n_ctx = vocab.n_ctx
        self.max_batch_tokens = max_batch_tokens
        self.table = KVSlotTable(num_sequences, num_cells, saved_max_bytes, block_tokens=block_tokens)
        self.budget = budget or PrefillBudget(max_tokens=max_batch_tokens)
        self.observer = observer or EngineObserver()
        self.clock = clock
        self.priorities = priorities or PriorityPolicy()
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._by_key: dict[int, Request] = {}
        self._pending_ops: list[KVOp] = []
        self._evictions: dict[str, Eviction] = {}

    # -- requests in and out ----------------------------------------------------

    def add(self, request: Request) -> None:
        self.waiting.append(request)
        self._by_key[request.key] = request

    def cancel(self, key: int) -> None:
        request = self._by_key.get(key)
        if request is not None:
            self._finish(request, FinishReason.CANCELLED, "", self.clock())

    def promote(self, key: int, priority: Priority) -> None:
        """Move a waiting request to a better class; a running one keeps its class (and its count)."""
        request = self._by_key.get(key)
        if request is not None and request.phase is Phase.WAITING and priority < request.spec.priority:
            request.spec = dataclasses.replace(request.spec, priority=priority)

    def release_session(self, session_id: str) -> bool:
        """Forget a session; its cells stay as a free prefix cache."""
        known = self.table.knows(session_id)
        self.table.drop_session(session_id)
        return known

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self._pending_ops)

    # -- plan ---------------------------------------------------------------------

    def plan(self) -> StepPlan:
        now = self.clock()
        plan = StepPlan(ops=self._pending_ops)
        self._pending_ops = []
        self._admit_waiting(plan.ops, now)
        self._ensure_decode_cells(plan.ops, now)
        for request in self.running:
            if request.phase is Phase.DECODE:
                slot = request.slot
                assert slot is not None
                plan.entries.append(BatchEntry(slot.seq_id, (request.generated[-1],), len(slot.tokens), request.key))
        plan.num_decode = len(plan.entries)
        free_room = self.max_batch_tokens - plan.num_decode
        room = min(self.budget.tokens_for_step(plan.num_decode), free_room)
        # Fair prefill protects the inter-token latency of running streams, but an interactive
        # prompt is not held back to protect lower classes: it prefills at full speed unless an
        # interactive stream is decoding.
        interactive_decoding = any(r.phase is Phase.DECODE and r.spec.priority is Priority.INTERACTIVE
                                   for r in self.running)
        prefilling = sorted((r for r in self.running if r.phase is Phase.PREFILL), key=lambda r: r.spec.priority)
        for request in prefilling:
            unthrottled = request.spec.priority is Priority.INTERACTIVE and not interactive_decoding
            allowed = free_room if unthrottled else min(room, free_room)
            if allowed <= 0:
                continue
            assert request.prompt is not None and request.slot is not None
            chunk = request.prompt[request.num_prefilled: request.num_prefilled + allowed]
            last = request.num_prefilled + len(chunk) == len(request.prompt)
            plan.entries.append(BatchEntry(request.slot.seq_id, tuple(chunk), request.num_prefilled,
                                           request.key if last else None))
            plan.num_prefill += len(chunk)
            room -= len(chunk)
            free_room -= len(chunk)
        return plan

    def _admit_waiting(self, ops: list[KVOp], now: float) -> None:
        running = count_by_class(self.running)
        for request in self.priorities.admission_order(self.waiting, now):
            priority = request.spec.priority
            if self.priorities.at_running_cap(priority, running):
                continue  # its class holds all the sequences it may; lower classes may still go
            outcome = self._admit(request, ops, now)
            if outcome is Admission.ADMITTED:
                running[priority] += 1
            elif outcome is Admission.BLOCKED:
                break

    def _admit(self, request: Request, ops: list[KVOp], now: float) -> Admission:
        try:
            if request.prompt is None:
                request.prompt = self._resolve_prompt(request)
        except DomainError as exc:
            self._fail(request, exc)
            return Admission.FAILED
        prompt = request.prompt
        session_id = request.spec.session_id
        parent = request.parent
        if parent is not None and parent.phase in (Phase.WAITING, Phase.RESTORING, Phase.PREFILL):
            return Admission.SKIP  # its prompt is not in cells yet
        slot = self.table.resident(session_id) if session_id else None
        if slot is not None and slot.busy_key is not None:
            return Admission.SKIP
        tenant_id = request.spec.tenant_id
        restoring = False
        if slot is None:
            slot = self.table.pick_free(prompt, tenant_id)
            if slot is None:
                victim = self.table.lru_idle_session(exclude=session_id)
                if victim is None:
                    return Admission.BLOCKED
                self._evict(victim, ops)
                slot = victim
            saved = self.table.saved.get(session_id) if session_id else None
            if saved is not None:
                self._truncate(slot, 0, ops)
                # The whole saved state lands before it is cut to the shared prefix.
                keep_guess = min(common_prefix_len(saved.tokens, prompt), len(prompt) - 1)
                if not self._reclaim_cells(len(saved.tokens) + len(prompt) - keep_guess, ops, protect=slot):
                    return Admission.BLOCKED
                self.table.take_saved(session_id)
                ops.append(KVOp(OpKind.RESTORE, seq_id=slot.seq_id, key=request.key, state=saved.state))
                self.table.adopt(slot, tenant_id, request.spec.prompt)
                self.table.append(slot, saved.tokens)
                slot.prompt_text, slot.prompt_tokens = saved.prompt_text, list(saved.prompt_tokens)
                restoring = True
        # Keep at least the last prompt token to decode: its logits give the first token.
        keep = min(self.table.reusable_prefix(slot, prompt, tenant_id), len(prompt) - 1)
        if not restoring:
            keep = self._share_prefix(request, slot, prompt, keep, ops)
        self._truncate(slot, keep, ops)
        self.table.adopt(slot, tenant_id, request.spec.prompt)
        if not self._reclaim_cells(len(prompt) - keep, ops, protect=slot):
            # Put the sequence back as it is (its prefix stays useful) and wait.
            return Admission.BLOCKED
        self.table.bind(slot, request.key, session_id, now)
        ops.append(KVOp(OpKind.OPEN_SAMPLER, key=request.key, params=request.spec.sampling))
        request.slot = slot
        request.num_cached = keep
        request.num_prefilled = keep
        request.phase = Phase.RESTORING if restoring else Phase.PREFILL
        request.text = StreamText(request.spec.sampling.stop)
        self.waiting.remove(request)
        self.running.append(request)
        return Admission.ADMITTED

    def _share_prefix(self, request: Request, slot: Slot, prompt: list[int], keep: int, ops: list[KVOp]) -> int:
        """Give ``slot`` the cells of a longer prefix another sequence holds; returns the tokens now cached.

        Another choice of the same request copies its parent's whole prompt
        but the last token (whose logits give a first token). Otherwise the
        prefix index names the sequence of the same tenant holding the longest
        prefix of ``prompt``: a session's system prompt and tools, a finished
        request's prompt. Sharing copies no memory (``llama_memory_seq_cp`` in
        the unified cache) and is worth it as soon as it beats ``slot``'s own cells.
        """
        parent = request.parent
        source: Slot | None
        if parent is not None and parent.slot is not None and parent in self.running:
            source, shared = parent.slot, len(prompt) - 1
        else:
            # A sequence being restored has no cells yet (the restore may still fail).
            pending = {r.slot.seq_id for r in self.running if r.phase is Phase.RESTORING and r.slot is not None}
            source, shared = self.table.longest_holder(prompt, request.spec.tenant_id,
                                                       exclude={slot.seq_id, *pending})
            shared = min(shared, len(prompt) - 1)
        if source is None or shared <= keep:
            return keep
        self._truncate(slot, 0, ops)
        ops.append(KVOp(OpKind.COPY, seq_id=slot.seq_id, src_seq_id=source.seq_id, keep=shared))
        self.table.share(source, slot, shared)
        self.observer.on_prefix_shared(shared)
        return shared

    def _truncate(self, slot: Slot, keep: int, ops: list[KVOp]) -> None:
        """Drop ``slot``'s cells from position ``keep`` on, in the table and (by an op) in the model."""
        if keep < len(slot.tokens):
            ops.append(KVOp(OpKind.TRUNCATE, seq_id=slot.seq_id, keep=keep))
            self.table.truncate(slot, keep)

    def _resolve_prompt(self, request: Request) -> list[int]:
        spec = request.spec
        if request.parent is not None and request.parent.prompt is not None:
            return list(request.parent.prompt)
        if spec.session_id and request.require_session and not self.table.knows(spec.session_id):
            raise NotFound(f"session_id: session {spec.session_id!r} holds no cache on this node",
                           field="session_id")
        if spec.prompt_tokens:
            field_name = "prompt_tokens"
            tokens = list(spec.prompt_tokens)
            check_token_ids(tokens, self.vocab.vocab_size(), field_name)
        else:
            field_name = "prompt"
            prev_text, prev_tokens = self.table.session_prompt(spec.session_id) if spec.session_id else ("", [])
            if prev_text and spec.prompt.startswith(prev_text):
                # The session's earlier prompt is already tokenized: only the new text is.
                tokens = prev_tokens + self.vocab.tokenize(spec.prompt[len(prev_text):], False, True)
            else:
                tokens = self.vocab.tokenize(spec.prompt, True, True)
        if not tokens:
            raise InvalidArgument(f"{field_name}: the prompt has no tokens", field=field_name)
        if len(tokens) >= self.n_ctx:
            raise InvalidArgument(
                f"{field_name}: the prompt takes {len(tokens)} tokens; the context holds {self.n_ctx}",
                field=field_name)
        return tokens

    def _reserved_cells(self) -> int:
        """Cells that prefilling requests will still fill."""
        return sum(len(r.prompt) - r.num_prefilled for r in self.running
                   if r.prompt is not None and r.phase in (Phase.PREFILL, Phase.RESTORING))

    def _reclaim_cells(self, needed: int, ops: list[KVOp], protect: Slot | None) -> bool:
        """Free cells until ``needed`` more fit: stale free sequences first, then idle sessions."""
        while self.table.free_cells - self._reserved_cells() < needed:
            stale = [s for s in self.table.slots
                     if s is not protect and s.busy_key is None and not s.session_id and s.tokens]
            if stale:
                # The one whose cells no other sequence shares frees the most.
                slot = max(stale, key=lambda s: (self.table.exclusive_cells(s), len(s.tokens)))
                ops.append(KVOp(OpKind.TRUNCATE, seq_id=slot.seq_id, keep=0))
                self.table.clear_free(slot)
                continue
            victim = self.table.lru_idle_session()
            if victim is None or victim is protect:
                return False
            self._evict(victim, ops)
        return True

    def _evict(self, slot: Slot, ops: list[KVOp]) -> None:
        eviction = self.table.evict(slot)
        self._evictions[eviction.session_id] = eviction
        ops.append(KVOp(OpKind.SAVE, seq_id=eviction.seq_id, session_id=eviction.session_id))
        ops.append(KVOp(OpKind.TRUNCATE, seq_id=eviction.seq_id, keep=0))

    def _ensure_decode_cells(self, ops: list[KVOp], now: float) -> None:
        decoding = [r for r in self.running if r.phase is Phase.DECODE]
        if self._reclaim_cells(len(decoding), ops, protect=None):
            return
        # The cache is full of running requests: stop the newest ones.
        overflow = len(decoding) - max(0, self.table.free_cells - self._reserved_cells())
        for request in reversed(decoding):
            if overflow <= 0:
                break
            self._finish(request, FinishReason.LENGTH, request.text.flush() if request.text else "", now)
            overflow -= 1

    # -- apply ----------------------------------------------------------------------

    def apply(self, plan: StepPlan, result: StepResult) -> None:
        now = self.clock()
        if plan.entries:
            self.budget.observe(plan.num_decode, plan.num_prefill, result.decode_ms)
            self.observer.on_step(plan.num_decode, plan.num_prefill, result.decode_ms)
        for session_id, state in result.saved.items():
            eviction = self._evictions.pop(session_id, None)
            if eviction is not None:
                self.table.store_saved(eviction, state)
        for key, ok in result.restored.items():
            request = self._by_key.get(key)
            if request is None or request.slot is None or request.phase is not Phase.RESTORING:
                continue
            if not ok:
                # Fall back to a full prefill in a clean sequence.
                self._pending_ops.append(KVOp(OpKind.TRUNCATE, seq_id=request.slot.seq_id, keep=0))
                self.table.truncate(request.slot, 0)
                request.num_cached = request.num_prefilled = 0
            request.phase = Phase.PREFILL
        for entry in plan.entries:
            request = self._by_key.get(entry.sampler_key) if entry.sampler_key is not None else None
            slot = self.table.slots[entry.seq_id]
            self.table.append(slot, entry.tokens)
            if request is None:
                owner = self._by_key.get(slot.busy_key) if slot.busy_key is not None else None
                if owner is not None and owner.phase is Phase.PREFILL:
                    owner.num_prefilled += len(entry.tokens)
                continue
            if request.phase is Phase.PREFILL:
                request.num_prefilled += len(entry.tokens)
                request.phase = Phase.DECODE
            self._on_token(request, result.sampled[request.key], now, result.logprobs.get(request.key))

    def _on_token(self, request: Request, token: int, now: float, logprob: TokenLogprob | None = None) -> None:
        assert request.text is not None and request.slot is not None
        if request.first_token_at is None:
            request.first_token_at = now
            self.observer.on_first_token((now - request.arrival) * 1000.0)
        elif request.last_token_at is not None:
            self.observer.on_token_gap((now - request.last_token_at) * 1000.0)
        request.last_token_at = now
        request.generated.append(token)
        if self.vocab.is_eog(token):
            self._finish(request, FinishReason.STOP, request.text.flush(), now)
            return
        piece = self.vocab.token_piece(token)
        text = request.text.push(piece)
        step = Delta(token_ids=(token,))
        if logprob is not None:
            top = tuple((t, lp, self.vocab.token_piece(t)) for t, lp in logprob.top)
            step = Delta(token_ids=(token,), logprobs=(logprob.logprob,), pieces=(piece,),
                         top_logprobs=(top,) if request.spec.sampling.top_logprobs else ())
        if request.text.stopped:
            self._finish(request, FinishReason.STOP, text, now, step)
        elif len(request.generated) >= request.spec.sampling.max_tokens or len(request.slot.tokens) + 1 >= self.n_ctx:
            self._finish(request, FinishReason.LENGTH, text + request.text.flush(), now, step)
        else:
            request.sink(dataclasses.replace(step, text=text))

    def _finish(self, request: Request, reason: FinishReason, text: str, now: float,
                step: Delta | None = None) -> None:
        """Ends ``request``; ``step`` carries the last token (ids, logprobs) when one was sampled."""
        self._by_key.pop(request.key, None)
        if request in self.waiting:
            self.waiting.remove(request)
        if request in self.running:
            self.running.remove(request)
            self._pending_ops.append(KVOp(OpKind.CLOSE_SAMPLER, key=request.key))
        slot = request.slot
        if slot is not None:
            if request.phase is Phase.RESTORING:
                # Restore not applied yet: the cells are in an unknown state.
                self._pending_ops.append(KVOp(OpKind.TRUNCATE, seq_id=slot.seq_id, keep=0))
                self.table.truncate(slot, 0)
            if slot.session_id and request.prompt is not None:
                slot.prompt_text = request.spec.prompt if not request.spec.prompt_tokens else ""
                slot.prompt_tokens = list(request.prompt) if slot.prompt_text else []
            self.table.release(slot, now)
        ttft = (request.first_token_at - request.arrival) * 1000.0 if request.first_token_at else 0.0
        usage = Usage(
            prompt_tokens=len(request.prompt or ()),
            cached_tokens=request.num_cached,
            generated_tokens=len(request.generated),
            ttft_ms=ttft,
            total_ms=(now - request.arrival) * 1000.0,
        )
        self.observer.on_finish(usage, reason)
        request.sink(dataclasses.replace(step or Delta(), text=text, finish_reason=reason, usage=usage))

    def _fail(self, request: Request, exc: DomainError) -> None:
        self._by_key.pop(request.key, None)
        if request in self.waiting:
            self.waiting.remove(request)
        request.sink(Delta(error=exc))
