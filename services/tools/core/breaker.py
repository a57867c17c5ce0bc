"""A circuit breaker per tool: stop calling a tool that keeps failing."""
from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Opens after ``failure_threshold`` failures within ``window_s``.

    While open every call is refused; after ``reset_timeout_s`` one probe
    call is let through (half-open): its success closes the breaker, its
    failure opens it for another ``reset_timeout_s``.
    """

    def __init__(self, failure_threshold: int, window_s: float, reset_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_threshold = max(1, failure_threshold)
        self.window_s = window_s
        self.reset_timeout_s = reset_timeout_s
        self.clock = clock
        self.state = BreakerState.CLOSED
        self.failures: deque[float] = deque()
        self.opened_at = 0.0
        self.probe_in_flight = False

    def allow(self) -> bool:
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            if self.clock() - self.opened_at < self.reset_timeout_s:
                return False
            self.state = BreakerState.HALF_OPEN
            self.probe_in_flight = False
        if self.probe_in_flight:
            return False
        self.probe_in_flight = True
        return True

    def retry_after_s(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self.reset_timeout_s - (self.clock() - self.opened_at))

    def record_success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures.clear()
        self.probe_in_flight = False

    def record_failure(self) -> None:
        now = self.clock()
        if self.state is BreakerState.HALF_OPEN:
            self._open(now)
            return
        self.failures.append(now)
        while self.failures and now - self.failures[0] > self.window_s:
            self.failures.popleft()
        if len(self.failures) >= self.failure_threshold:
            self._open(now)

    def release_probe(self) -> None:
        """The probe ended without a verdict (cancelled): let another one through."""
        self.probe_in_flight = False

    def _open(self, now: float) -> None:
        self.state = BreakerState.OPEN
        self.opened_at = now
        self.failures.clear()
        self.probe_in_flight = False
