"""Per-tenant and per-model token buckets that push back with a retry delay."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from services.common.errors import ResourceExhausted


@dataclass
class TokenBucket:
    rate_per_s: float
    burst: float
    tokens: float = -1.0
    updated: float = 0.0

    def try_take(self, now: float) -> float:
        """Take one token; returns 0 on success, else seconds until one is free."""
        if self.tokens < 0:
            self.tokens, self.updated = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate_per_s)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s if self.rate_per_s > 0 else math.inf


@dataclass
class RateLimiter:
    """Runs started per second, by tenant and by model; rate <= 0 turns a limit off."""

    tenant_rate_per_s: float
    tenant_burst: float
    model_rate_per_s: float
    model_burst: float
    clock: Callable[[], float] = time.monotonic
    _tenants: dict[str, TokenBucket] = field(default_factory=dict)
    _models: dict[str, TokenBucket] = field(default_factory=dict)

    def admit(self, tenant_id: str, model: str) -> None:
        now = self.clock()
        checks = []
        if self.tenant_rate_per_s > 0:
            checks.append(("tenant", tenant_id, self._tenants.setdefault(
                tenant_id, TokenBucket(self.tenant_rate_per_s, self.tenant_burst))))
        if self.model_rate_per_s > 0:
            checks.append(("model", model, self._models.setdefault(
                model, TokenBucket(self.model_rate_per_s, self.model_burst))))
        for scope, key, bucket in checks:
            wait_s = bucket.try_take(now)
            if wait_s > 0:
                # Refund what earlier buckets gave, so a refused run costs nothing.
                for _s, _k, earlier in checks:
                    if earlier is bucket:
                        break
                    earlier.tokens += 1.0
                retry_ms = max(1, int(math.ceil(wait_s * 1000))) if math.isfinite(wait_s) else 60_000
                raise ResourceExhausted(f"{scope} {key!r} is over its run rate; retry in {retry_ms} ms",
                                        reason=f"{scope.upper()}_RATE_LIMITED", retry_after_ms=retry_ms,
                                        metadata={scope: key})
