"""Settings of the llama.cpp inference node (env LLMESH_INFERENCE_<FIELD>, CLI --field-name)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50051


@dataclass(frozen=True)
class Settings(ServerSettings):
    # gRPC port (0 picks one)
    port: int = DEFAULT_PORT
    #: Name reported in GetLoad and every reply; empty means host:port.
    node_id: str = ""
    #: "llama" (llama.cpp) or "synthetic" (no model, fixed-rate tokens).
    backend: str = "llama"
    #: GGUF file; empty means the bundled Gemma 3 270M.
    model_path: str = ""
    model_name: str = "gemma-3-270m"
    #: More names for the same model, each with sampling defaults:
    #: "gemma-fast:temperature=0,max_tokens=64;gemma-warm:temperature=0.8".
    model_aliases: str = ""
    #: KV cells shared by all sequences of one engine (the context size).
    n_ctx: int = 8192
    #: Sequences decoded together (and sessions kept resident) per engine.
    n_seq_max: int = 16
    #: Most tokens in one llama_decode call.
    n_batch: int = 512
    #: CPU threads for llama.cpp; 0 means one per CPU core.
    n_threads: int = 0
    #: Round each step's logits rows up to a multiple of this; 0: 4 on CPU, 1 on GPU.
    output_rows_multiple: int = 0
    #: llama.cpp's extra CPU weight layouts (repacked, AMX): "auto" (off where the CPU advertises AMX,
    #: whose tiles crash some virtual machines with SIGILL), "on" or "off".
    cpu_extra_buffers: str = "auto"
    #: Layers on the GPU; -1 sizes them from free memory, 0 forces the CPU.
    n_gpu_layers: int = -1
    #: Engines (one per GPU); 0 means one per usable device.
    max_engines: int = 0
    #: Memory kept free on each GPU: the larger of this fraction and gpu_margin_mb.
    gpu_margin_fraction: float = 0.1
    gpu_margin_mb: int = 512
    #: Requests waiting for a sequence before RESOURCE_EXHAUSTED.
    max_queue: int = 64
    #: While a prompt is prefilled, a step may take this many times a pure decode step.
    prefill_slowdown: float = 1.8
    #: Absolute step-time target in ms while prefilling; 0 uses prefill_slowdown.
    itl_target_ms: float = 0.0
    #: Prompt tokens per step even when the target cannot be met.
    prefill_min_tokens: int = 4
    #: When a request reaches an idle engine, wait this long for a burst to start together (0: never).
    admission_window_ms: float = 5.0
    #: Tokens per block of the prefix index: a new sequence (session or not) shares the KV cells of
    #: the longest prefix another sequence of its tenant holds, in whole blocks and more; 0: never.
    prefix_block_tokens: int = 32
    #: Characters per text block of the prefix summary in GetLoad (for prefix-aware routing); 0: none.
    prefix_block_chars: int = 256
    #: Most block hashes in that summary.
    prefix_summary_max: int = 256
    #: Memory for saved states of evicted sessions.
    saved_state_max_mb: int = 256
    #: Default max_tokens when a request carries no sampling parameters.
    default_max_tokens: int = 256
    #: Synthetic backend: tokens per second of each stream.
    synthetic_tokens_per_s: float = 50.0
    #: Synthetic backend: extra delay of the step that finishes a prompt.
    synthetic_ttft_ms: float = 0.0
    #: Synthetic backend: prefill cost per prompt token.
    synthetic_prefill_ms_per_token: float = 0.0
    #: Synthetic backend: text every generation writes before it ends (e.g. a scripted tool call);
    #: empty: endless filler.
    synthetic_reply: str = ""
    #: Identical deterministic requests in flight share one decode.
    merge_requests: bool = True
    #: Answers of deterministic, session-free requests kept for exact replay; 0 (default) disables the cache.
    response_cache_entries: int = 0
    #: How long a cached answer may be replayed.
    response_cache_ttl_s: float = 300.0
    #: Answers kept for requests that opt into the semantic cache; 0 (default) disables it.
    semantic_cache_entries: int = 0
    #: Cosine similarity a stored prompt needs to answer a new one; 0 uses the
    #: embedder's own default (model 0.75, lexical 0.85).
    semantic_cache_threshold: float = 0.0
    #: "model" (this node's llama.cpp model), "lexical" (hashed words and
    #: trigrams, no model) or "auto" (model on a llama backend, else lexical).
    semantic_embedder: str = "auto"
    semantic_cache_ttl_s: float = 300.0
    #: Per-tenant economics as JSON: {"tenant": {"merge", "cache", "semantic_cache": bool,
    #: "max_priority": "interactive|normal|batch"}}; "default" applies to unlisted tenants.
    tenant_policies: str = ""
    #: Sequences of each engine that batch requests may never hold (kept for interactive/normal).
    batch_reserved_sequences: int = 1
    #: Waiting requests per class before that class gets RESOURCE_EXHAUSTED; 0 means max_queue only.
    max_waiting_interactive: int = 0
    max_waiting_normal: int = 0
    max_waiting_batch: int = 0
    #: After waiting this long a normal / batch request is admitted like an interactive one (0: never).
    max_wait_ms_normal: float = 10_000.0
    max_wait_ms_batch: float = 30_000.0
