"""Protobuf <-> core dataclasses for the inference service."""
from __future__ import annotations

from llmesh.inference.v1 import inference_pb2 as pb

from services.common.errors import InvalidArgument
from services.inference.core.embedding import EmbedResult
from services.inference.core.node import GenerateCall, ModelInfo, SamplingRequest
from services.inference.core.types import Delta, FinishReason, GenerateSpec, LoadReport, Priority, session_key

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


def sampling_request(request: pb.GenerateRequest) -> SamplingRequest:
    s = request.sampling
    return SamplingRequest(
        temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, min_p=s.min_p, repeat_penalty=s.repeat_penalty,
        seed=s.seed if s.HasField("seed") else None, max_tokens=s.max_tokens, stop=tuple(s.stop),
        grammar=s.grammar, logprobs=request.logprobs, top_logprobs=request.top_logprobs,
        given=request.HasField("sampling"))


def generate_call(request: pb.GenerateRequest) -> GenerateCall:
    if request.priority not in _PRIORITY:
        raise InvalidArgument(f"priority: unknown value {request.priority}", field="priority")
    spec = GenerateSpec(prompt=request.prompt, prompt_tokens=tuple(request.prompt_tokens),
                        session_id=session_key(request.tenant_id, request.session_id),
                        priority=_PRIORITY[request.priority],
                        request_id=request.request_id, tenant_id=request.tenant_id, n=request.n or 1)
    return GenerateCall(spec, sampling_request(request), model=request.model,
                        require_cached_session=request.require_cached_session, skip_cache=request.skip_cache,
                        semantic_cache=request.semantic_cache)


def generate_response(delta: Delta, node_id: str, model: str = "") -> pb.GenerateResponse:
    reply = pb.GenerateResponse(text=delta.text, token_ids=delta.token_ids, node_id=node_id,
                                cached=delta.cached, merged=delta.merged, logprobs=delta.logprobs,
                                token_pieces=delta.pieces, index=delta.index)
    for alternatives in delta.top_logprobs:
        reply.top_logprobs.add(token_ids=[t for t, _, _ in alternatives], logprobs=[lp for _, lp, _ in alternatives],
                               pieces=[piece for _, _, piece in alternatives])
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
        kv_cells_saved=load.kv_cells_saved,
        prefix_summary=pb.PrefixSummary(block_chars=load.prefix_block_chars, block_hashes=load.prefix_blocks),
    )


def model(info: ModelInfo) -> pb.Model:
    return pb.Model(name=info.name, n_ctx=info.n_ctx, n_gpu_layers=info.n_gpu_layers, device=info.device)


def embed_response(result: EmbedResult, node_id: str, model: str) -> pb.EmbedResponse:
    return pb.EmbedResponse(embeddings=[pb.Embedding(values=vector.tolist()) for vector in result.vectors],
                            prompt_tokens=result.prompt_tokens, model=model, node_id=node_id)
