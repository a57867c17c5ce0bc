"""Result cache for idempotent tools, keyed by everything the result depends on."""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar

from services.common.ttl_cache import TtlCache

V = TypeVar("V")


def canonical_json(value: Any) -> str:
    """One spelling per value: sorted keys, no spaces, unicode kept."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(tool: str, version: str, arguments: dict[str, Any], scope: str, state_token: str) -> str:
    """Tool, version, canonical arguments, the workspace they resolve in and the state they read."""
    material = canonical_json([tool, version, arguments, scope, state_token])
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


class ResultCache(TtlCache[V]):
    """An LRU with a TTL (``services.common.ttl_cache``); entries past their TTL are never returned."""

    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(max_entries, ttl_s, clock)
