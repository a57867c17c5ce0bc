"""Prometheus metrics of the inference engines."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.inference.core.observer import EconomicsObserver, EngineObserver
from services.inference.core.types import FinishReason, LoadReport, Usage

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10, 30)

RUNNING = Gauge("llmesh_inference_running_requests", "Requests holding a sequence.", ["engine"])
WAITING = Gauge("llmesh_inference_waiting_requests", "Requests waiting for a sequence.", ["engine"])
KV_USAGE = Gauge("llmesh_inference_kv_usage_ratio", "Used KV cells / total KV cells.", ["engine"])
SESSIONS = Gauge("llmesh_inference_sessions", "Sessions with resident or saved KV state.", ["engine"])
TTFT = Histogram("llmesh_inference_ttft_seconds", "Time from arrival to the first token.", ["engine"],
                 buckets=_LATENCY_BUCKETS)
ITL = Histogram("llmesh_inference_inter_token_seconds", "Time between two tokens of a stream.", ["engine"],
                buckets=_LATENCY_BUCKETS)
STEP = Histogram("llmesh_inference_step_seconds", "Duration of one llama_decode step.", ["engine", "kind"],
                 buckets=_LATENCY_BUCKETS)
PROMPT_TOKENS = Counter("llmesh_inference_prompt_tokens_total", "Prompt tokens of finished requests.", ["engine"])
CACHED_TOKENS = Counter("llmesh_inference_cached_tokens_total", "Prompt tokens served from the KV cache.",
                        ["engine"])
GENERATED_TOKENS = Counter("llmesh_inference_generated_tokens_total", "Generated tokens.", ["engine"])
MERGED = Counter("llmesh_inference_merged_requests_total",
                 "Requests that shared the decode of an identical request in flight.")
CACHE_LOOKUPS = Counter("llmesh_inference_response_cache_lookups_total",
                        "Response cache lookups of deterministic requests.", ["result"])
CACHE_HIT_RATIO = Gauge("llmesh_inference_response_cache_hit_ratio", "Response cache hits / lookups since start.")
CACHE_ENTRIES = Gauge("llmesh_inference_response_cache_entries", "Answers held in the response cache.")
SEMANTIC_LOOKUPS = Counter("llmesh_inference_semantic_cache_lookups_total",
                           "Semantic cache lookups of opted-in single-turn requests.", ["result"])
SEMANTIC_HIT_RATIO = Gauge("llmesh_inference_semantic_cache_hit_ratio", "Semantic cache hits / lookups since start.")
PREFIX_HITS = Counter("llmesh_inference_prefix_hits_total",
                      "New sequences that took the KV cells of a prefix another sequence holds.", ["engine"])
PREFIX_SHARED_TOKENS = Counter("llmesh_inference_prefix_shared_tokens_total",
                               "Prompt tokens taken from another sequence's cells instead of prefilled.", ["engine"])
KV_CELLS_SAVED = Gauge("llmesh_inference_kv_cells_saved", "KV cells that prefix sharing saves now.", ["engine"])
FINISHED = Counter("llmesh_inference_requests_total", "Finished requests by reason.", ["engine", "reason"])


class PrometheusObserver(EngineObserver):
    def __init__(self, engine: str) -> None:
        self.engine = engine

    def on_step(self, num_decode: int, num_prefill: int, decode_ms: float) -> None:
        kind = "mixed" if num_decode and num_prefill else ("prefill" if num_prefill else "decode")
        STEP.labels(self.engine, kind).observe(decode_ms / 1000.0)

    def on_first_token(self, ttft_ms: float) -> None:
        TTFT.labels(self.engine).observe(ttft_ms / 1000.0)

    def on_token_gap(self, gap_ms: float) -> None:
        ITL.labels(self.engine).observe(gap_ms / 1000.0)

    def on_finish(self, usage: Usage, reason: FinishReason) -> None:
        PROMPT_TOKENS.labels(self.engine).inc(usage.prompt_tokens)
        CACHED_TOKENS.labels(self.engine).inc(usage.cached_tokens)
        GENERATED_TOKENS.labels(self.engine).inc(usage.generated_tokens)
        FINISHED.labels(self.engine, reason.value).inc()

    def on_prefix_shared(self, num_tokens: int) -> None:
        PREFIX_HITS.labels(self.engine).inc()
        PREFIX_SHARED_TOKENS.labels(self.engine).inc(num_tokens)

    def on_load(self, load: LoadReport) -> None:
        KV_CELLS_SAVED.labels(self.engine).set(load.kv_cells_saved)
        RUNNING.labels(self.engine).set(load.num_running)
        WAITING.labels(self.engine).set(load.queue_depth)
        KV_USAGE.labels(self.engine).set(load.kv_usage)
        SESSIONS.labels(self.engine).set(load.num_sessions)


class PrometheusEconomicsObserver(EconomicsObserver):
    def on_merged(self) -> None:
        MERGED.inc()

    def on_cache_lookup(self, hit: bool, hit_rate: float, entries: int) -> None:
        CACHE_LOOKUPS.labels("hit" if hit else "miss").inc()
        CACHE_HIT_RATIO.set(hit_rate)
        CACHE_ENTRIES.set(entries)

    def on_semantic_lookup(self, hit: bool, hit_rate: float) -> None:
        SEMANTIC_LOOKUPS.labels("hit" if hit else "miss").inc()
        SEMANTIC_HIT_RATIO.set(hit_rate)
