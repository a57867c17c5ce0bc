"""Fair prefill: how many prompt tokens may ride along with one decode step.

Every prompt token added to a step makes that step, and so the inter-token
latency of every running stream, longer. Rather than a fixed chunk, the
budget is the largest chunk whose measured cost keeps a step within
``slowdown`` times a pure decode step of the same width (or within an absolute
``itl_target_ms``). Costs are learned online from the steps actually run, per
chunk size on a power-of-two ladder; an unmeasured size is tried only after
the size below it fitted with room to spare, so the budget climbs to the
limit and backs off when the machine gets slower.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Up to the largest n_batch worth having; ``max_tokens`` (n_batch) cuts it.
LADDER = tuple(2 ** i for i in range(17))
EWMA_ALPHA = 0.2


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else old + EWMA_ALPHA * (new - old)


@dataclass
class PrefillBudget:
    #: Allowed step time as a multiple of a pure decode step (ITL slowdown).
    slowdown: float = 1.8
    #: Absolute step-time target in ms; when > 0 it replaces ``slowdown``.
    itl_target_ms: float = 0.0
    #: Tokens prefilled per step even when the target cannot be met, so a
    #: long prompt always makes progress.
    min_tokens: int = 4
    #: Tokens per step when nothing is decoding (nobody to be fair to).
    max_tokens: int = 512
    _decode_ms: dict[int, float] = field(default_factory=dict)
    _extra_ms: dict[int, float] = field(default_factory=dict)

    def observe(self, num_decode: int, num_prefill: int, step_ms: float) -> None:
        """Learn from one executed step."""
        if num_decode <= 0:
            return
        if num_prefill == 0:
            self._decode_ms[num_decode] = _ewma(self._decode_ms.get(num_decode), step_ms)
            return
        base = self.decode_ms(num_decode)
        if base is None:
            return
        size = _ladder_floor(num_prefill)
        self._extra_ms[size] = _ewma(self._extra_ms.get(size), max(0.0, step_ms - base))

    def decode_ms(self, num_decode: int) -> float | None:
        """Estimated time of a pure decode step of ``num_decode`` streams."""
        if num_decode in self._decode_ms:
            return self._decode_ms[num_decode]
        if not self._decode_ms:
            return None
        # Nearest measured width, scaled linearly: good enough until measured.
        nearest = min(self._decode_ms, key=lambda n: abs(n - num_decode))
        return self._decode_ms[nearest] * (0.5 + 0.5 * num_decode / nearest)

    def target_ms(self, num_decode: int) -> float | None:
        if self.itl_target_ms > 0:
            return self.itl_target_ms
        base = self.decode_ms(num_decode)
        return None if base is None else base * self.slowdown

    def tokens_for_step(self, num_decode: int) -> int:
        """Prompt tokens the next step may carry next to ``num_decode`` decodes."""
        if num_decode <= 0:
            return self.max_tokens
        base = self.decode_ms(num_decode)
        target = self.target_ms(num_decode)
        if base is None or target is None:
            # No pure decode step measured yet: keep prefill out of this one
            # so the next step measures the baseline.
            return 0
        headroom = target - base
        floor = _ladder_floor(max(1, self.min_tokens))
        chosen = 0
        for size in LADDER:
            if size < floor:
                continue
            if size > self.max_tokens:
                break
            cost = self._extra_ms.get(size)
            if cost is None:
                # Try an unmeasured size only when its cost, extrapolated
                # from the sizes measured below it, fits.
                if chosen == 0 or self._extrapolate(size) <= headroom:
                    chosen = size
                break
            if cost <= headroom:
                chosen = size
            else:
                break
        return max(chosen, self.min_tokens)

    def _extrapolate(self, size: int) -> float:
        measured = sorted(n for n in self._extra_ms if n < size)
        if len(measured) >= 2:
            (n0, n1) = measured[-2:]
            c0, c1 = self._extra_ms[n0], self._extra_ms[n1]
            slope = max(0.0, (c1 - c0) / (n1 - n0))
            return c1 + slope * (size - n1)
        n1 = measured[-1]
        # One point: assume half of it is a fixed cost per step.
        return self._extra_ms[n1] * (0.5 + 0.5 * size / n1)


def _ladder_floor(n: int) -> int:
    best = LADDER[0]
    for size in LADDER:
        if size <= n:
            best = size
    return best
