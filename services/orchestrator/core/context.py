"""ContextManager: the history a session's next prompt is built from, kept in budget.

Token counts are the tokenizer's (through the PromptPipeline), per item, and
are not usage: usage is what each model call consumed, reported by inference.
When the next prompt would pass `fraction * n_ctx`, the history is compacted,
trying in order:

1. ``summarize``   older exchanges become one summary written by the model;
2. ``drop_oldest`` whole exchanges are dropped, oldest first (a tool call and
                   its output always go together);
3. ``minimal``     only the system turn and the last user message are kept.

If even the minimal context does not leave room for one generated token the
prompt is never sent: `ContextOverflow` is raised instead. Compactions are
written to the message log as summary records naming what they replaced, so
a restored session sees the same history.
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from services.common.errors import DomainError, FailedPrecondition
from services.orchestrator.core.history import (
    ASSISTANT,
    SUMMARY,
    TOOL_OUTPUT,
    USER,
    CallRef,
    HistoryItem,
    group_by_user_turn,
)
from services.orchestrator.core.ports import MessageRecord
from services.orchestrator.core.prompt import Prompt, PromptPipeline

log = logging.getLogger("llmesh.orchestrator.context")

SUMMARIZE = "summarize"
DROP_OLDEST = "drop_oldest"
MINIMAL = "minimal"

Summarizer = Callable[[Sequence[HistoryItem]], Awaitable[str]]


class ContextOverflow(FailedPrecondition):
    default_reason = "CONTEXT_OVERFLOW"


class MessageLog(Protocol):
    async def append(self, records: Sequence[MessageRecord]) -> list[int]: ...


@dataclass(frozen=True)
class CompactionReport:
    strategy: str
    tokens_before: int
    tokens_after: int


@dataclass(frozen=True)
class PreparedPrompt:
    prompt: Prompt
    max_tokens: int
    compactions: tuple[CompactionReport, ...]


class ContextManager:
    def __init__(self, pipeline: PromptPipeline, *, n_ctx: int, system: HistoryItem, fraction: float = 0.8,
                 summarizer: Summarizer | None = None, message_log: MessageLog | None = None) -> None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError("fraction must be in (0, 1]")
        self.pipeline = pipeline
        self.n_ctx = n_ctx
        self.fraction = fraction
        self.summarizer = summarizer
        self.message_log = message_log
        # The session's next event seq when this context was last known current
        # (0 = unknown): a lock grant naming the same seq means no other replica
        # ran a turn since, so the store has no messages this context lacks.
        self.current_at_event_seq = 0
        self.system = system
        self.items: list[HistoryItem] = []
        # Highest message position seen, including compaction markers (not kept as items).
        self._last_position = 0
        self._writes: asyncio.Task | None = None
        # Items added but not yet appended, with the log of the run that added them.
        self._unwritten: list[tuple[MessageLog, HistoryItem]] = []

    @property
    def budget_tokens(self) -> int:
        return int(self.fraction * self.n_ctx)

    async def add(self, *items: HistoryItem) -> None:
        """Add items now; they reach the message log in order, off the turn's critical path.

        `flush()` waits for the writes (and raises their failure); compaction flushes
        first, because it needs every item's position.
        """
        counted = [item.counted(await self.pipeline.item_tokens(item)) for item in items]
        self.items.extend(counted)
        if self.message_log is not None:
            # The log is bound now: a later run may swap in its own before this write runs.
            self._unwritten.extend((self.message_log, item) for item in counted)
            if self._writes is None or self._writes.done():
                self._writes = asyncio.create_task(self._write_unwritten(self._writes))

    async def _write_unwritten(self, previous: asyncio.Task | None) -> None:
        """One append per run of items that gathered while the last one was in flight."""
        if previous is not None:
            await previous  # a failed write fails every later one: the log must stay in order
        while self._unwritten:
            message_log = self._unwritten[0][0]
            num = next((n for n, (log, _) in enumerate(self._unwritten) if log is not message_log),
                       len(self._unwritten))
            items = [item for _, item in self._unwritten[:num]]
            positions = await message_log.append([to_record(i) for i in items])
            del self._unwritten[:num]
            stored = {id(i): i.stored(p) for i, p in zip(items, positions, strict=True)}
            self._last_position = max(self._last_position, *positions) if positions else self._last_position
            self.items = [stored.get(id(i), i) for i in self.items]

    async def flush(self) -> None:
        if self._writes is not None:
            await self._writes

    def pending_writes(self) -> asyncio.Task | None:
        """The write of the last item added; it runs after every earlier one."""
        return self._writes

    @property
    def last_position(self) -> int:
        return max((i.position for i in self.items), default=self._last_position)

    async def _tokens(self, items: Sequence[HistoryItem]) -> int:
        total = await self.pipeline.overhead_tokens() + await self.pipeline.count(self.system)
        for item in items:
            total += item.num_tokens or await self.pipeline.count(item)
        return total

    async def _fits(self, items: Sequence[HistoryItem]) -> bool:
        return await self._tokens(items) <= self.budget_tokens

    async def prepare(self, max_new_tokens: int) -> PreparedPrompt:
        """The next prompt, compacting first if it would pass the budget."""
        reports: list[CompactionReport] = []
        if not await self._fits(self.items):
            reports.append(await self._compact())
        prompt = await self.pipeline.build([self.system, *self.items])
        room = self.n_ctx - prompt.num_tokens
        if room < 1:
            raise ContextOverflow(f"prompt of {prompt.num_tokens} tokens leaves no room in n_ctx {self.n_ctx}")
        return PreparedPrompt(prompt=prompt, max_tokens=min(max_new_tokens, room), compactions=tuple(reports))

    async def _compact(self) -> CompactionReport:
        await self.flush()
        before = await self._tokens(self.items)
        groups = group_by_user_turn(self.items)
        if self.summarizer is not None and len(groups) >= 2:
            older = [i for g in groups[:-1] for i in g]
            try:
                text = (await self.summarizer(older)).strip()
            except DomainError as exc:
                log.warning("summary failed, dropping instead", extra={"reason": exc.reason})
                text = ""
            if text:
                summary = HistoryItem(kind=SUMMARY, text=text)
                summary = summary.counted(await self.pipeline.item_tokens(summary))
                candidate = [summary, *groups[-1]]
                if await self._fits(candidate):
                    return await self._commit(SUMMARIZE, before, candidate, summary)
        kept = list(groups)
        while len(kept) > 1 and not await self._fits([i for g in kept for i in g]):
            kept.pop(0)
        if len(kept) < len(groups) and await self._fits([i for g in kept for i in g]):
            return await self._commit(DROP_OLDEST, before, [i for g in kept for i in g], None)
        last_user = next((i for i in reversed(self.items) if i.kind == USER), None)
        if last_user is not None and await self._fits([last_user]):
            return await self._commit(MINIMAL, before, [last_user], None)
        raise ContextOverflow(
            f"even the system turn and the last user message pass {self.budget_tokens} tokens "
            f"({self.fraction:.2f} of n_ctx {self.n_ctx})")

    async def _commit(self, strategy: str, before: int, items: list[HistoryItem],
                      summary: HistoryItem | None) -> CompactionReport:
        kept = {id(i) for i in items}
        dropped = [i.position for i in self.items if id(i) not in kept and i.position]
        marker = summary or HistoryItem(kind=SUMMARY)
        marker = HistoryItem(kind=SUMMARY, text=marker.text, num_tokens=marker.num_tokens, tokens=marker.tokens,
                             metadata={"compaction": strategy, "drop_positions": dropped})
        if self.message_log is not None:
            (position,) = await self.message_log.append([to_record(marker)])
            marker = marker.stored(position)
            self._last_position = max(self._last_position, position)
        if summary is not None:
            items = [marker if i is summary else i for i in items]
        self.items = items
        after = await self._tokens(self.items)
        log.info("compacted", extra={"strategy": strategy, "tokens_before": before, "tokens_after": after})
        return CompactionReport(strategy=strategy, tokens_before=before, tokens_after=after)

    def restore(self, records: Sequence[MessageRecord]) -> None:
        """Rebuild the items from the message log, replaying compactions."""
        items: list[HistoryItem] = []
        for record in records:
            self._last_position = max(self._last_position, record.position)
            item = from_record(record)
            if item.kind == SUMMARY:
                dropped = set(item.metadata.get("drop_positions", []))
                items = [i for i in items if i.position not in dropped]
                if item.text:
                    # The summary stands where what it replaced stood, before the kept tail.
                    last = max(dropped, default=0)
                    at = next((n for n, i in enumerate(items) if i.position > last), len(items))
                    items.insert(at, item)
                continue
            items.append(item)
        self.items = items


def to_record(item: HistoryItem) -> MessageRecord:
    meta: dict[str, Any] = dict(item.metadata)
    if item.calls:
        meta["tool_calls"] = [{"call_id": c.call_id, "name": c.name, "arguments": c.arguments} for c in item.calls]
    if item.kind == TOOL_OUTPUT:
        meta.update(call_id=item.call_id, name=item.name, status=item.status)
    return MessageRecord(role=item.kind, content=item.text, metadata=meta, num_tokens=item.num_tokens)


def from_record(record: MessageRecord) -> HistoryItem:
    meta = dict(record.metadata)
    calls = tuple(CallRef(c["call_id"], c["name"], c.get("arguments", {})) for c in meta.pop("tool_calls", []))
    kind = record.role if record.role in (USER, ASSISTANT, TOOL_OUTPUT, SUMMARY) else USER
    return HistoryItem(kind=kind, text=record.content, calls=calls, call_id=meta.pop("call_id", ""),
                       name=meta.pop("name", ""), status=meta.pop("status", ""), num_tokens=record.num_tokens,
                       position=record.position, metadata=meta)
