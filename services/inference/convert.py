"""Protobuf <-> core dataclasses for the inference service."""
from __future__ import annotations

from typing import Mapping

from llmesh.inference.v1 import inference_pb2 as pb

from services.common.tenants import TenantPolicy
from services.common.errors import InvalidArgument
from services.inference.core.types import Delta, FinishReason, GenerateSpec, LoadReport, Priority, SamplingParams

_PRIORITY = {
    pb.PRIORITY_UNSPECIFIED: Priority.NORMAL,
    pb.PRIORITY_INTERACTIVE: Priority.INTERACTIVE,
    pb.PRIORITY_NORMAL: Priority.NORMAL,
    pb.PRIORITY_BATCH: Priority.BATCH,
}
_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


def sampling_params(request: pb.GenerateRequest, default_max_tokens: int,
                    alias: Mapping[str, float | int] | None = None) -> SamplingParams:
    """Zero values mean the defaults: the model alias's, else the server's.

    max_tokens must be > 0 once sampling is given, unless the alias supplies it.
    """
    d = alias or {}
    s = request.sampling

    def pick(value: float | int, key: str, server_default: float | int) -> float | int:
        return value if value != 0 else d.get(key, server_default)

    seed = s.seed if s.HasField("seed") else d.get("seed")
    return SamplingParams(
        temperature=float(pick(s.temperature, "temperature", 0.0)),
        top_p=float(pick(s.top_p, "top_p", 1.0)),
        top_k=int(pick(s.top_k, "top_k", 0)),
        min_p=float(pick(s.min_p, "min_p", 0.0)),
        repeat_penalty=float(pick(s.repeat_penalty, "repeat_penalty", 1.0)),
        seed=int(seed) if seed is not None else None,
        max_tokens=int(pick(s.max_tokens, "max_tokens", 0 if request.HasField("sampling") else default_max_tokens)),
        stop=tuple(s.stop),
        grammar=s.grammar,
        logprobs=request.logprobs,
    )


def generate_spec(request: pb.GenerateRequest, default_max_tokens: int,
                  alias: Mapping[str, float | int] | None = None, tenant: TenantPolicy | None = None) -> GenerateSpec:
    if request.priority not in _PRIORITY:
        raise InvalidArgument(f"priority: unknown value {request.priority}", field="priority")
    priority = _PRIORITY[request.priority]
    if tenant is not None:
        priority = Priority[tenant.clamp_priority(priority.name.lower()).upper()]
    return GenerateSpec(
        prompt=request.prompt,
        prompt_tokens=tuple(request.prompt_tokens),
        session_id=request.session_id,
        sampling=sampling_params(request, default_max_tokens, alias),
        priority=priority,
        request_id=request.request_id,
        tenant_id=request.tenant_id,
    )


def generate_response(delta: Delta, node_id: str, model: str = "") -> pb.GenerateResponse:
    reply = pb.GenerateResponse(text=delta.text, token_ids=delta.token_ids, node_id=node_id,
                                cached=delta.cached, merged=delta.merged, logprobs=delta.logprobs)
    if delta.finish_reason is not None:
        reply.finish_reason = _FINISH[delta.finish_reason]
        reply.model = model
    if delta.usage is not None:
        u = delta.usage
        reply.usage.CopyFrom(pb.Usage(prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                                      generated_tokens=u.generated_tokens, ttft_ms=u.ttft_ms, total_ms=u.total_ms))
    return reply


def load_response(load: LoadReport, node_id: str) -> pb.GetLoadResponse:
    return pb.GetLoadResponse(
        node_id=node_id,
        queue_depth=load.queue_depth,
        num_running=load.num_running,
        num_free_sequences=load.num_free_sequences,
        num_sequences=load.num_sequences,
        kv_used_cells=load.kv_used_cells,
        kv_total_cells=load.kv_total_cells,
        kv_usage=load.kv_usage,
        tokens_per_second=load.tokens_per_second,
        num_sessions=load.num_sessions,
    )
