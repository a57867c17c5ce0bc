"""Agent sessions: what a session is (model, system prompt, tools) and its validation."""
from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgument, require
from services.orchestrator.core.ports import SessionRecord, StorePort

MAX_PAGE_SIZE = 200
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class AgentSession:
    tenant_id: str
    session_id: str
    title: str
    model: str
    system_prompt: str
    tools: tuple[str, ...]
    create_time: float
    last_seq: int = 0


def from_record(record: SessionRecord, last_seq: int = 0) -> AgentSession:
    meta = record.metadata
    return AgentSession(tenant_id=record.tenant_id, session_id=record.session_id, title=record.title,
                        model=str(meta.get("model", "")), system_prompt=str(meta.get("system_prompt", "")),
                        tools=tuple(meta.get("tools", [])), create_time=record.create_time, last_seq=last_seq)


def require_ids(tenant_id: str, session_id: str | None = None) -> None:
    require(bool(tenant_id.strip()), "tenant_id", "must not be empty")
    if session_id is not None:
        require(bool(session_id.strip()), "session_id", "must not be empty")


class SessionDirectory:
    """Sessions through the store; what a session is never changes, so lookups are cached."""

    def __init__(self, store: StorePort, cache_size: int = 4096) -> None:
        self._store = store
        self._cache: OrderedDict[tuple[str, str], AgentSession] = OrderedDict()
        self._cache_size = cache_size

    async def create(self, *, request_id: str, tenant_id: str, title: str, model: str, system_prompt: str,
                     tools: Sequence[str]) -> AgentSession:
        require_ids(tenant_id)
        require(len(title) <= 200, "title", "must be at most 200 characters")
        for name in tools:
            if not _TOOL_NAME.match(name):
                raise InvalidArgument(f"tools: {name!r} is not a tool name", field="tools")
        record = await self._store.create_session(
            request_id=request_id, tenant_id=tenant_id, title=title,
            metadata={"model": model, "system_prompt": system_prompt, "tools": list(tools)})
        return from_record(record)

    async def get(self, tenant_id: str, session_id: str) -> AgentSession:
        require_ids(tenant_id, session_id)
        key = (tenant_id, session_id)
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        session = from_record(await self._store.get_session(tenant_id=tenant_id, session_id=session_id))
        self._cache[key] = session
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return session

    async def list(self, tenant_id: str, page_size: int, page_token: str) -> tuple[list[AgentSession], str]:
        require_ids(tenant_id)
        require(page_size >= 0, "page_size", "must not be negative")
        records, token = await self._store.list_sessions(tenant_id=tenant_id,
                                                         page_size=min(page_size or 50, MAX_PAGE_SIZE),
                                                         page_token=page_token)
        return [from_record(r) for r in records], token
