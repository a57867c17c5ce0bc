"""Wiring of the inference node: backends per device, engines, servicer, lifecycle."""
from __future__ import annotations

import asyncio
import logging
import os
from typing import cast

import grpc
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.errors import InvalidArgument, Unavailable
from services.common.tenants import parse_tenant_policies
from services.inference.config import Settings
from services.inference.core.aliases import parse_aliases
from services.inference.core.backend import Backend
from services.inference.core.embedding import BatchEmbedder, EmbeddingRunner, LexicalBatchEmbedder
from services.inference.core.engine import Engine, EngineConfig
from services.inference.core.front import GenerationFront
from services.inference.core.node import InferenceNode
from services.inference.core.placement import CPU, ModelFootprint, Placement, plan_pool
from services.inference.core.pool import EnginePool
from services.inference.core.priorities import PriorityPolicy, default_policy
from services.inference.core.response_cache import ResponseCache
from services.inference.core.semantic_cache import Embedder, HashingEmbedder, SemanticCache
from services.inference.core.types import Delta, Priority
from services.inference.metrics import PrometheusEconomicsObserver, PrometheusObserver
from services.inference.servicer import InferenceServicer

SERVICE_NAME = "llmesh.inference.v1.InferenceService"

log = logging.getLogger("llmesh.inference")

# Gemma 3 270M has 18 layers; used for GPU sizing before the model is open.
DEFAULT_NUM_LAYERS = 18
# KV bytes per cell (both caches, all layers) measured on Gemma 3 270M, plus compute buffers.
KV_BYTES_PER_CELL = 18 * 1024
COMPUTE_BUFFER_BYTES = 256 << 20


def engine_config(settings: Settings) -> EngineConfig:
    if settings.admission_window_ms < 0:
        raise InvalidArgument("admission_window_ms: must be >= 0 (0: no wait)", field="admission_window_ms")
    for name in ("prefix_block_tokens", "prefix_block_chars", "prefix_summary_max"):
        if getattr(settings, name) < 0:
            raise InvalidArgument(f"{name}: must be >= 0 (0: off)", field=name)
    return EngineConfig(
        max_queue=settings.max_queue,
        prefill_slowdown=settings.prefill_slowdown,
        itl_target_ms=settings.itl_target_ms,
        prefill_min_tokens=settings.prefill_min_tokens,
        saved_state_max_bytes=settings.saved_state_max_mb << 20,
        priorities=priority_policy(settings),
        admission_window_ms=settings.admission_window_ms,
        prefix_block_tokens=settings.prefix_block_tokens,
        prefix_block_chars=settings.prefix_block_chars,
        prefix_summary_max=settings.prefix_summary_max,
    )


def priority_policy(settings: Settings) -> PriorityPolicy:
    for name in ("batch_reserved_sequences", "max_waiting_interactive", "max_waiting_normal", "max_waiting_batch",
                 "max_wait_ms_normal", "max_wait_ms_batch"):
        if getattr(settings, name) < 0:
            raise InvalidArgument(f"{name}: must be >= 0", field=name)
    return default_policy(
        settings.n_seq_max, batch_reserved_sequences=settings.batch_reserved_sequences,
        max_waiting={Priority.INTERACTIVE: settings.max_waiting_interactive,
                     Priority.NORMAL: settings.max_waiting_normal, Priority.BATCH: settings.max_waiting_batch},
        max_wait_ms={Priority.NORMAL: settings.max_wait_ms_normal, Priority.BATCH: settings.max_wait_ms_batch})


def build_front(settings: Settings, pool: EnginePool, model_embedder: Embedder | None = None) -> GenerationFront:
    if settings.response_cache_entries < 0:
        raise InvalidArgument("response_cache_entries: must be >= 0", field="response_cache_entries")
    if settings.response_cache_ttl_s <= 0:
        raise InvalidArgument("response_cache_ttl_s: must be > 0", field="response_cache_ttl_s")
    cache: ResponseCache[list[Delta]] | None = None
    if settings.response_cache_entries:
        cache = ResponseCache(settings.response_cache_entries, settings.response_cache_ttl_s)
    return GenerationFront(pool, pool.primary.backend.model_name, merge=settings.merge_requests, cache=cache,
                           semantic=semantic_cache(settings, pool.primary.backend, model_embedder),
                           observer=PrometheusEconomicsObserver(), run_model=pool.primary.call)


# Similarity a stored prompt needs by default, per embedder (docs/economics.md).
DEFAULT_THRESHOLDS = {"model": 0.75, "lexical": 0.85}


def semantic_cache(settings: Settings, backend: Backend,
                   model_embedder: Embedder | None = None) -> SemanticCache[list[Delta]] | None:
    """``model_embedder``: the node's own (shared with Embed), used when the cache embeds with the model."""
    if settings.semantic_cache_entries < 0:
        raise InvalidArgument("semantic_cache_entries: must be >= 0", field="semantic_cache_entries")
    if not 0.0 <= settings.semantic_cache_threshold <= 1.0:
        raise InvalidArgument("semantic_cache_threshold: must be within [0, 1] (0: the embedder's default)",
                              field="semantic_cache_threshold")
    if settings.semantic_cache_ttl_s <= 0:
        raise InvalidArgument("semantic_cache_ttl_s: must be > 0", field="semantic_cache_ttl_s")
    kind = settings.semantic_embedder
    if kind not in ("auto", "model", "lexical"):
        raise InvalidArgument("semantic_embedder: must be auto, model or lexical", field="semantic_embedder")
    on_llama = hasattr(backend, "llama_model")
    if kind == "model" and not on_llama:
        raise InvalidArgument("semantic_embedder: 'model' needs the llama backend", field="semantic_embedder")
    if not settings.semantic_cache_entries:
        return None
    if kind == "auto":
        kind = "model" if on_llama else "lexical"
    if kind == "model":
        from services.inference.adapters.llama_backend import LlamaBackend
        from services.inference.adapters.llama_embedder import LlamaEmbedder

        # on_llama: the backend has the llama.cpp model (checked by attribute, as wrappers may forward it).
        embedder: Embedder = model_embedder or LlamaEmbedder(cast(LlamaBackend, backend),
                                                             n_threads=settings.n_threads)
    else:
        embedder = HashingEmbedder()
    threshold = settings.semantic_cache_threshold or DEFAULT_THRESHOLDS[kind]
    return SemanticCache(embedder, threshold, settings.semantic_cache_entries, settings.semantic_cache_ttl_s)


# Tokens the model embedder's context holds (one input's most); n_batch when larger.
EMBED_N_CTX = 512


def node_embedder(settings: Settings, backend: Backend) -> BatchEmbedder:
    """Embed's embedder: the model's own on a llama backend (its context opens on first use), else lexical."""
    if hasattr(backend, "llama_model"):
        from services.inference.adapters.llama_backend import LlamaBackend
        from services.inference.adapters.llama_embedder import LlamaEmbedder

        return LlamaEmbedder(cast(LlamaBackend, backend), n_ctx=max(EMBED_N_CTX, settings.n_batch),
                             n_threads=settings.n_threads)
    return LexicalBatchEmbedder(lambda text: backend.tokenize(text, False, False), backend.n_ctx)


def placements(settings: Settings, model_path: str) -> list[Placement]:
    if settings.n_gpu_layers == 0:
        return [CPU]
    from services.inference.adapters.devices import probe_gpus

    footprint = ModelFootprint(weights_bytes=os.path.getsize(model_path), num_layers=DEFAULT_NUM_LAYERS,
                               context_bytes=settings.n_ctx * KV_BYTES_PER_CELL + COMPUTE_BUFFER_BYTES)
    pool = plan_pool(probe_gpus(), footprint, max_engines=settings.max_engines,
                     margin_fraction=settings.gpu_margin_fraction, margin_bytes=settings.gpu_margin_mb << 20)
    if settings.n_gpu_layers > 0:
        pool = [Placement(p.device, p.device_index, min(p.n_gpu_layers, settings.n_gpu_layers)) for p in pool]
    return pool


# llama.cpp's CPU kernels project onto the vocabulary fastest in groups of four rows (docs/inference.md).
CPU_OUTPUT_ROWS_MULTIPLE = 4


def build_backends(settings: Settings) -> list[Backend]:
    """Blocking: loads the model once per device."""
    if settings.backend == "synthetic":
        from services.inference.adapters.synthetic_backend import SyntheticBackend

        return [SyntheticBackend(n_ctx=settings.n_ctx, n_seq_max=settings.n_seq_max, n_batch=settings.n_batch,
                                 tokens_per_s=settings.synthetic_tokens_per_s, ttft_ms=settings.synthetic_ttft_ms,
                                 prefill_ms_per_token=settings.synthetic_prefill_ms_per_token,
                                 reply=settings.synthetic_reply,
                                 model_name=settings.model_name)]
    if settings.backend != "llama":
        raise InvalidArgument(f"backend: expected 'llama' or 'synthetic', got {settings.backend!r}", field="backend")
    from services.gemma.model_cache import ensure_model
    from services.inference.adapters.llama_backend import LlamaBackend
    from services.inference.adapters.llama_model import EXTRA_BUFFER_CHOICES

    if settings.output_rows_multiple < 0:
        raise InvalidArgument("output_rows_multiple: must be >= 0 (0: 4 on CPU, 1 on GPU)",
                              field="output_rows_multiple")
    if settings.cpu_extra_buffers not in EXTRA_BUFFER_CHOICES:
        raise InvalidArgument(f"cpu_extra_buffers: one of {', '.join(EXTRA_BUFFER_CHOICES)}, "
                              f"got {settings.cpu_extra_buffers!r}", field="cpu_extra_buffers")
    model_path = settings.model_path or str(ensure_model())
    backends: list[Backend] = []
    for placement in placements(settings, model_path):
        log.info("loading model", extra={"event": "model_loading", "device": placement.device,
                                         "n_gpu_layers": placement.n_gpu_layers})
        backends.append(LlamaBackend(model_path, n_ctx=settings.n_ctx, n_seq_max=settings.n_seq_max,
                                     n_batch=settings.n_batch, n_threads=settings.n_threads,
                                     n_gpu_layers=placement.n_gpu_layers, device_index=placement.device_index,
                                     device=placement.device, model_name=settings.model_name,
                                     output_rows_multiple=settings.output_rows_multiple or (
                                         CPU_OUTPUT_ROWS_MULTIPLE if placement.n_gpu_layers == 0 else 1),
                                     extra_buffers=settings.cpu_extra_buffers))
    return backends


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.node_id = settings.node_id or f"{settings.host}:{settings.port}"
        self.pool: EnginePool | None = None
        self.front: GenerationFront | None = None
        self.embeddings: EmbeddingRunner | None = None
        node = InferenceNode(self._ready_pool, settings.default_max_tokens, front=self._ready_front,
                             aliases=parse_aliases(settings.model_aliases),
                             tenants=parse_tenant_policies(settings.tenant_policies),
                             embeddings=self._ready_embeddings)
        self._servicer = InferenceServicer(node, self.node_id)

    def register(self, server: grpc.aio.Server) -> None:
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(self._servicer, server)

    async def start(self) -> None:
        backends = await asyncio.to_thread(build_backends, self.settings)
        engines = [Engine(b, engine_config(self.settings), PrometheusObserver(f"engine-{i}"), name=f"engine-{i}")
                   for i, b in enumerate(backends)]
        pool = EnginePool(engines)
        embedder = node_embedder(self.settings, pool.primary.backend)
        front = build_front(self.settings, pool, cast(Embedder, embedder) if embedder.runs_model else None)
        pool.start()
        self.embeddings = EmbeddingRunner(embedder, pool.primary.call, max_requests=max(1, self.settings.max_queue))
        self.front = front
        self.pool = pool

    def _ready_pool(self) -> EnginePool:
        if self.pool is None:
            raise Unavailable("the inference node is not serving (loading or stopped)", reason="NOT_READY")
        return self.pool

    def _ready_front(self) -> GenerationFront:
        self._ready_pool()
        assert self.front is not None
        return self.front

    def _ready_embeddings(self) -> EmbeddingRunner:
        self._ready_pool()
        assert self.embeddings is not None
        return self.embeddings

    async def close(self) -> None:
        front, self.front = self.front, None
        embeddings, self.embeddings = self.embeddings, None
        if embeddings is not None and hasattr(embeddings.embedder, "close"):
            # Before the engines free the weights it runs on (the semantic cache may share it).
            embeddings.embedder.close()
        embedder = front.semantic.embedder if front is not None and front.semantic is not None else None
        if embedder is not None and hasattr(embedder, "close"):
            # Before the engines free the weights it runs on.
            embedder.close()
        if self.pool is not None:
            pool, self.pool = self.pool, None
            await asyncio.to_thread(pool.stop)


def build_app(settings: Settings) -> App:
    return App(settings)
