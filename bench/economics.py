"""Request economics benchmark on an in-process inference node (synthetic backend).

Three measurements, each on a fresh node, timed by the gRPC client:

- merge_decode_ratio: engine requests decoded per 8 identical concurrent
  greedy requests (goal 1), averaged over rounds with different prompts.
- cache_hit_latency_ratio: median end-to-end time of a cache hit over that of
  the same request's miss (goal <= 0.05).
- interactive_ttft_ratio_under_batch_flood: median TTFT of interactive
  requests while a batch flood holds sequences and fills the queue, over the
  median on an idle node (goal <= 1.5); the same flood without a reserved
  sequence is reported for contrast.

The synthetic backend stands in for the model (tokens at a fixed rate, a fixed
prefill delay), so the numbers measure the node's scheduling, not llama.cpp.

    python bench/economics.py --out bench/results/economics.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import time
from contextlib import asynccontextmanager
from pathlib import Path

from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.clients import make_channel
from services.common.runtime import running_service
from services.inference.config import Settings
from services.inference.server import build_app
from tests.support.auth import service_identity

TOKENS_PER_S = 100.0
PREFILL_MS = 60.0
NUM_SEQUENCES = 4


def node_settings(**overrides) -> Settings:
    values = dict(port=0, backend="synthetic", n_ctx=8192, n_seq_max=NUM_SEQUENCES, max_queue=256,
                  synthetic_tokens_per_s=TOKENS_PER_S, synthetic_ttft_ms=PREFILL_MS, response_cache_entries=256)
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def node(**overrides):
    config = node_settings(**overrides)
    async with running_service(build_app(config), config) as svc:
        # The node authenticates every call: the client presents the orchestrator's key.
        async with make_channel(svc.address, service_identity("orchestrator"), traced=False, options=[]) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            # A key's first call costs a KDF on the node (one per concurrent first call): never timed.
            await stub.GetLoad(pb.GetLoadRequest())
            yield svc, stub


def gen(prompt: str, max_tokens: int, priority: int = pb.PRIORITY_NORMAL) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, priority=priority, sampling=pb.SamplingParams(max_tokens=max_tokens))


async def timed(stub, request: pb.GenerateRequest) -> tuple[float, float, bool]:
    """(ms to the first message, ms to the end, whether the answer was cached)."""
    start = time.perf_counter()
    first_ms, cached = 0.0, False
    async for reply in stub.Generate(request):
        if not first_ms:
            first_ms = (time.perf_counter() - start) * 1000.0
        cached = reply.cached
    return first_ms, (time.perf_counter() - start) * 1000.0, cached


def engine_requests(svc) -> int:
    """Requests the node's engine actually decoded (one sampler each)."""
    return svc.app.pool.engines[0].backend.samplers_opened


async def measure_merging(rounds: int) -> dict:
    ratios = []
    async with node(response_cache_entries=0) as (svc, stub):
        for i in range(rounds):
            before = engine_requests(svc)
            await asyncio.gather(*(timed(stub, gen(f"identical prompt {i}", 32)) for _ in range(8)))
            ratios.append(engine_requests(svc) - before)
    return {"decodes_per_round": ratios, "merge_decode_ratio": statistics.mean(ratios)}


async def measure_cache(rounds: int) -> dict:
    misses, hits, all_cached = [], [], True
    async with node() as (_, stub):
        for i in range(rounds):
            request = gen(f"cacheable prompt {i}", 32)
            _, miss_ms, miss_cached = await timed(stub, request)
            _, hit_ms, hit_cached = await timed(stub, request)
            misses.append(miss_ms)
            hits.append(hit_ms)
            all_cached = all_cached and hit_cached and not miss_cached
    miss, hit = statistics.median(misses), statistics.median(hits)
    return {"miss_ms_p50": miss, "hit_ms_p50": hit, "every_repeat_was_cached": all_cached,
            "cache_hit_latency_ratio": hit / miss}


async def interactive_ttfts(stub, samples: int) -> list[float]:
    ttfts = []
    for i in range(samples):
        first_ms, _, _ = await timed(stub, gen(f"interactive {i} {time.monotonic()}", 2, pb.PRIORITY_INTERACTIVE))
        ttfts.append(first_ms)
        await asyncio.sleep(0.02)
    return ttfts


async def measure_flood(samples: int, flood_size: int, reserved: int, job_tokens: int) -> dict:
    async with node(batch_reserved_sequences=reserved) as (_, stub):
        idle = await interactive_ttfts(stub, samples)
        flood = [stub.Generate(gen(f"batch job {i}", job_tokens, pb.PRIORITY_BATCH)) for i in range(flood_size)]
        await asyncio.sleep(0.3)  # the flood takes its sequences and queues the rest
        load = await stub.GetLoad(pb.GetLoadRequest())
        flooded = await interactive_ttfts(stub, samples)
        for call in flood:
            call.cancel()
    return {"batch_reserved_sequences": reserved, "flood_size": flood_size, "batch_job_tokens": job_tokens,
            "batch_running": load.num_running, "batch_queued": load.queue_depth,
            "idle_ttft_ms_p50": statistics.median(idle), "flooded_ttft_ms_p50": statistics.median(flooded),
            "ratio": statistics.median(flooded) / statistics.median(idle)}


async def main(out: Path) -> dict:
    merging = await measure_merging(rounds=5)
    cache = await measure_cache(rounds=7)
    reserved = await measure_flood(samples=9, flood_size=40, reserved=1, job_tokens=100_000)
    # Without a reserved sequence an interactive request waits for some batch job to end, so the
    # contrast uses short jobs (0.5 s): with long ones it would wait for as long as they run.
    unreserved = await measure_flood(samples=3, flood_size=40, reserved=0, job_tokens=50)
    result = {
        "backend": "synthetic",
        "note": "synthetic backend: fixed token rate and prefill delay; measures the node's scheduling, not a model",
        "setup": {"tokens_per_s": TOKENS_PER_S, "prefill_ms": PREFILL_MS, "n_seq_max": NUM_SEQUENCES},
        "merge_decode_ratio": merging["merge_decode_ratio"],
        "cache_hit_latency_ratio": round(cache["cache_hit_latency_ratio"], 4),
        "interactive_ttft_ratio_under_batch_flood": round(reserved["ratio"], 3),
        "goals": {"merge_decode_ratio": 1, "cache_hit_latency_ratio": 0.05,
                  "interactive_ttft_ratio_under_batch_flood": 1.5},
        "merging": merging,
        "cache": cache,
        "flood_with_reserved_sequence": reserved,
        "flood_without_reserved_sequence": unreserved,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(out.write_text, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/economics.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(main(args.out)), indent=2))
