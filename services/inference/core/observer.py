"""Hooks the engine calls so metrics stay outside the core."""
from __future__ import annotations

from services.inference.core.types import FinishReason, LoadReport, Usage


class EngineObserver:
    """No-op base; the Prometheus observer overrides what it records."""

    def on_step(self, num_decode: int, num_prefill: int, decode_ms: float) -> None:
        return None

    def on_first_token(self, ttft_ms: float) -> None:
        return None

    def on_token_gap(self, gap_ms: float) -> None:
        return None

    def on_finish(self, usage: Usage, reason: FinishReason) -> None:
        return None

    def on_prefix_shared(self, num_tokens: int) -> None:
        """A new sequence took ``num_tokens`` prompt cells another sequence holds."""
        return None

    def on_load(self, load: LoadReport) -> None:
        return None


class EconomicsObserver:
    """No-op base for merging and response-cache events."""

    def on_merged(self) -> None:
        return None

    def on_cache_lookup(self, hit: bool, hit_rate: float, entries: int) -> None:
        return None

    def on_semantic_lookup(self, hit: bool, hit_rate: float) -> None:
        return None
