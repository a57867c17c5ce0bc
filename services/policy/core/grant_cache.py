"""Session-wide grants a policy replica has seen, per (tenant, session).

An approval for the rest of the session is a final state: once granted it is
never taken back, so a grant seen once may answer later calls of its session
without asking the store again. A miss proves nothing (the grant may have been
recorded a moment ago through another replica): the caller asks the store.
Bounded in entries (least recently used go first) and in age (an entry that
old is asked of the store again, which also notices grants the store has
since dropped with their session).
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from services.common.ttl_cache import TtlCache


def _key(tenant_id: str, session_id: str, subject_key: str) -> str:
    # Subject keys can be long (a whole script): the cache keeps a digest.
    text = json.dumps([tenant_id, session_id, subject_key], ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class SessionGrantCache:
    def __init__(self, max_grants: int = 100_000, ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._grants: TtlCache[str] = TtlCache(max_grants, ttl_s, clock)

    def add(self, tenant_id: str, session_id: str, subject_key: str, approval_id: str) -> None:
        self._grants.put(_key(tenant_id, session_id, subject_key), approval_id)

    def covers(self, tenant_id: str, session_id: str, subject_key: str) -> bool:
        return self._grants.get(_key(tenant_id, session_id, subject_key)) is not None

    def __len__(self) -> int:
        return len(self._grants)
