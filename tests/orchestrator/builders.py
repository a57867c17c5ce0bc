"""Builders for orchestrator tests: an Orchestrator over the in-memory store and fakes."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core.orchestrator import Orchestrator, OrchestratorConfig
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.runs import RunLimits
from tests.orchestrator.fakes import FakePolicy, FakeTools, ScriptedInference

FAST_RETRY = RetryPolicy(max_attempts=3, base_delay_s=0.001, max_delay_s=0.01)


@dataclass
class Rig:
    orchestrator: Orchestrator
    store: MemoryStore
    inference: ScriptedInference
    tools: FakeTools
    policy: FakePolicy

    async def session(self, tenant_id: str = "acme", tools: Sequence[str] = (), system_prompt: str = "Be brief."):
        return await self.orchestrator.sessions.create(request_id="", tenant_id=tenant_id, title="t", model="gemma",
                                                       system_prompt=system_prompt, tools=tools)


def make_rig(replies: Sequence[Any] = (), *, n_ctx: int = 2048, store: MemoryStore | None = None,
             tools: FakeTools | None = None, inference: ScriptedInference | None = None, max_workers: int = 0,
             limits: RunLimits | None = None, **config: Any) -> Rig:
    store = store or MemoryStore()
    inference = inference or ScriptedInference(replies, n_ctx=n_ctx)
    tools = tools or FakeTools()
    policy = FakePolicy(tools)
    cfg = replace(OrchestratorConfig(retry=FAST_RETRY, event_batch_interval_s=0.005, max_workers=max_workers,
                                     limits=limits or RunLimits()), **config)
    orchestrator = Orchestrator(store=store, inference=inference, tools=tools, policy=policy, config=cfg)
    return Rig(orchestrator, store, inference, tools, policy)


async def collect(events) -> list:
    return [e async for e in events]
