"""Which model names the OpenAI endpoints accept: the ones the inference pool serves.

A name nobody serves is a 404 (``MODEL_NOT_FOUND``) before any generation
starts. The list comes from the TextGenerator and is kept for ``ttl_s``; a
name missing from it triggers one refresh, at most every ``min_refresh_s``,
so a flood of made-up names costs the pool at most one listing per interval.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.common import errors
from services.gateway.core.ports import TextGenerator

# Names resolved by the serving side rather than listed: "" is the node's
# default model, "auto" asks the balancer's router to pick.
ROUTED_NAMES = frozenset({"", "auto"})


class ModelCatalog:
    def __init__(self, generator: TextGenerator, *, ttl_s: float = 30.0, min_refresh_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.generator = generator
        self.ttl_s = ttl_s
        self.min_refresh_s = min_refresh_s
        self._clock = clock
        self._names: frozenset[str] = frozenset()
        self._listed_at: float | None = None
        self._lock = asyncio.Lock()

    async def names(self, *, refresh: bool = False) -> frozenset[str]:
        """The served names; listed again when stale, or when asked and the last listing is not brand new."""
        async with self._lock:
            now = self._clock()
            age = None if self._listed_at is None else now - self._listed_at
            if age is None or age >= self.ttl_s or (refresh and age >= self.min_refresh_s):
                self._names = frozenset(await self.generator.list_models())
                self._listed_at = self._clock()
            return self._names

    async def require(self, model: str) -> None:
        """Return if ``model`` is served (or routed); else raise NotFound naming ``model``."""
        if model in ROUTED_NAMES or model in await self.names():
            return
        served = await self.names(refresh=True)
        if model not in served:
            listed = ", ".join(repr(name) for name in sorted(served)[:10])
            raise errors.NotFound(f"model: {model[:200]!r} is not served here (served: {listed or 'none'}); "
                                  "GET /v1/models lists them", reason="MODEL_NOT_FOUND", field="model")
