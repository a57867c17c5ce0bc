"""Exponential backoff with full jitter for transient failures."""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from services.common.errors import Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 3
    base_delay_s: float = 0.05
    max_delay_s: float = 2.0

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, base * 2^attempt)] so retries spread out."""
        return rng.uniform(0.0, min(self.max_delay_s, self.base_delay_s * (2 ** attempt)))


async def with_retries(fn: Callable[[], Awaitable[T]], policy: RetryPolicy, *,
                       retry_on: tuple[type[BaseException], ...] = (Unavailable,),
                       rng: random.Random | None = None,
                       on_retry: Callable[[int, BaseException], None] | None = None) -> T:
    """Call `fn` until it succeeds, retrying only `retry_on` errors."""
    rng = rng or random.Random()
    for attempt in range(policy.max_attempts):
        try:
            return await fn()
        except retry_on as exc:
            if attempt + 1 >= policy.max_attempts:
                raise
            if on_retry is not None:
                on_retry(attempt + 1, exc)
            await asyncio.sleep(policy.delay_s(attempt, rng))
    raise AssertionError("unreachable")
