"""What happens to a task after a failed attempt."""
from __future__ import annotations

from dataclasses import dataclass

from services.store.core.models import TaskState


@dataclass(frozen=True)
class RetryPolicy:
    base_backoff_ms: int = 1_000
    max_backoff_ms: int = 300_000

    def backoff_ms(self, attempts: int) -> int:
        """Exponential: base, 2*base, 4*base, ... capped at max_backoff_ms."""
        exponent = max(0, attempts - 1)
        if exponent >= 40:  # avoid huge ints; the cap applies long before
            return self.max_backoff_ms
        return min(self.max_backoff_ms, self.base_backoff_ms * (2 ** exponent))

    def after_failure(self, attempts: int, max_attempts: int, permanent: bool, now_ms: int) -> tuple[TaskState, int]:
        """(next state, run-after time) once attempt number ``attempts`` failed."""
        if permanent or attempts >= max_attempts:
            return TaskState.DEAD, now_ms
        return TaskState.READY, now_ms + self.backoff_ms(attempts)
