"""Two orchestrator replicas in one process, sharing one in-memory store (and the policy's approvals)."""
from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from services.common.errors import Cancelled
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.builders import Rig, make_rig
from tests.orchestrator.fakes import FakeTools, ScriptedInference


class Clock:
    """The store's clock, moved by the test: lock leases expire when it says."""

    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


class Severable:
    """A replica's link to the shared store; once severed, every call fails as if the replica were gone."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store
        self.severed = False

    def _check(self) -> None:
        if self.severed:
            raise Cancelled("this replica stopped")

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._store, name)
        if inspect.isasyncgenfunction(target):
            async def stream(**kwargs: Any) -> AsyncIterator[Any]:
                self._check()
                async for item in target(**kwargs):
                    self._check()
                    yield item
            return stream

        async def call(**kwargs: Any) -> Any:
            self._check()
            return await target(**kwargs)
        return call


@dataclass
class Pair:
    store: MemoryStore
    clock: Clock
    tools: FakeTools
    a: Rig
    b: Rig


@contextlib.asynccontextmanager
async def two_replicas(a_replies: Sequence[Any] = (), b_replies: Sequence[Any] = (), *,
                       a_store: Any = None, store: MemoryStore | None = None, clock: Clock | None = None,
                       a_limits: RunLimits | None = None, b_limits: RunLimits | None = None) -> AsyncIterator[Pair]:
    """Replicas "a" and "b" over one store and one tools/policy fake, each watching session controls."""
    clock = clock or Clock()
    store = store or MemoryStore(clock=clock)
    tools = FakeTools()
    a = make_rig(a_replies, store=a_store or store, tools=tools, inference=ScriptedInference(a_replies),
                 limits=a_limits, replica_id="a")
    b = make_rig(b_replies, store=store, tools=tools, inference=ScriptedInference(b_replies), limits=b_limits,
                 replica_id="b")
    for rig in (a, b):
        rig.orchestrator.start()
        assert await rig.orchestrator.wait_ready(5.0), "the control watch did not get live"
    try:
        yield Pair(store, clock, tools, a, b)
    finally:
        for rig in (a, b):
            await asyncio.wait_for(rig.orchestrator.close(), 10)


async def until_terminal(events: AsyncIterator[AgentEvent], seen: list[AgentEvent] | None = None) -> list[AgentEvent]:
    """Events up to the first final or error one (into `seen` as they come, when given)."""
    seen = [] if seen is None else seen
    async for event in events:
        seen.append(event)
        if event.is_terminal:
            break
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()
    return seen
