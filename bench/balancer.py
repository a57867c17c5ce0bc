"""Balancer benchmark: scored P2C with affinity vs round robin on 3 nodes, one 3x slower.

Multi-turn conversations run concurrently against three real inference
nodes on their synthetic backend (tests/inference/client/synthetic_nodes.py: the
inference service's own scheduler, queueing on a fixed number of sequences
and per-session KV, so a turn on the node holding its history skips
re-prefilling it; tokens come at a fixed rate instead of from a model). The same workload runs once per
strategy on fresh nodes; TTFT is measured by the client, from the call to
the first token. Writes JSON (see docs/inference-client.md).

    python bench/balancer.py --out bench/results/balancer.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from llmesh.inference.v1 import inference_pb2

from services.inference.client import Balancer, BalancerSettings
from tests.inference.client.synthetic_nodes import SyntheticNodeSpec, synthetic_nodes
from tests.support.auth import service_identity

# The synthetic tokenizer is byte-level: 0.08 ms a byte is ~0.4 ms a word.
NODE = SyntheticNodeSpec(node_id="node", tokens_per_s=250.0, ttft_ms=15.0, prefill_ms_per_token=0.08,
                         n_seq_max=4, max_tokens=12)
SLOWDOWN = 3.0
WORDS_PER_TURN = 40


async def timed_generate(balancer: Balancer, request: inference_pb2.GenerateRequest
                         ) -> tuple[float, inference_pb2.GenerateResponse]:
    """Stream ``request`` through ``balancer``: ms to its first token, and its last reply (with usage)."""
    started = time.perf_counter()
    first_at = None
    last = None
    async for reply in balancer.generate(request):
        if first_at is None and reply.token_ids:
            first_at = time.perf_counter()
        last = reply
    assert first_at is not None and last is not None
    return (first_at - started) * 1000, last


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def run_strategy(strategy: str, num_sessions: int, num_turns: int, seed: int) -> dict[str, object]:
    configs = [replace(NODE, node_id=f"node-{i}") for i in range(3)]
    configs[2].slowdown = SLOWDOWN
    served: dict[str, int] = {c.node_id: 0 for c in configs}
    settings = BalancerSettings(strategy=strategy, health_interval_s=0.5, load_interval_s=0.05)
    ttfts_ms: list[float] = []
    later_turns = 0
    later_turn_hits = 0
    cached_tokens = 0
    prompt_tokens = 0
    rng = random.Random(seed)
    async with synthetic_nodes(*configs) as nodes:
        # The nodes authenticate every call: the balancer presents the orchestrator's key, as in the mesh.
        async with Balancer([n.address for n in nodes], settings, rng=random.Random(seed),
                            identity=service_identity("orchestrator")) as balancer:

            async def conversation(session_id: str, think_s: list[float]) -> None:
                nonlocal later_turns, later_turn_hits, cached_tokens, prompt_tokens
                history = f"system: you are session {session_id}."
                previous_node = ""
                for turn in range(num_turns):
                    history += " user:" + " word" * WORDS_PER_TURN
                    request = inference_pb2.GenerateRequest(
                        prompt=history, session_id=session_id,
                        sampling=inference_pb2.SamplingParams(max_tokens=NODE.max_tokens))
                    ttft_ms, last = await timed_generate(balancer, request)
                    ttfts_ms.append(ttft_ms)
                    # A hit: the turn ran on the node that served the previous
                    # turn, the one holding this session's whole KV cache.
                    if turn:
                        later_turns += 1
                        later_turn_hits += last.node_id == previous_node
                    previous_node = last.node_id
                    served[last.node_id] += 1
                    cached_tokens += last.usage.cached_tokens
                    prompt_tokens += last.usage.prompt_tokens
                    history += " model:" + " tok" * last.usage.generated_tokens
                    await asyncio.sleep(think_s[turn])

            started = time.perf_counter()
            # Between turns an agent runs tools or a user types: 50-250 ms here.
            plans = [[rng.uniform(0.05, 0.25) for _ in range(num_turns)] for _ in range(num_sessions)]
            await asyncio.gather(*(conversation(f"s{i}", plans[i]) for i in range(num_sessions)))
            wall_s = time.perf_counter() - started
        per_node = {c.node_id + (" (3x slower)" if c.slowdown > 1 else ""): served[c.node_id] for c in configs}
    return {
        "strategy": strategy,
        "num_requests": len(ttfts_ms),
        "ttft_ms_p50": round(statistics.median(ttfts_ms), 2),
        "ttft_ms_p95": round(percentile(ttfts_ms, 95), 2),
        "ttft_ms_p99": round(percentile(ttfts_ms, 99), 2),
        "affinity_cache_hit_rate": round(later_turn_hits / later_turns, 4) if later_turns else None,
        "cached_prompt_token_fraction": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
        "requests_per_node": per_node,
        "wall_s": round(wall_s, 2),
    }


async def main(args: argparse.Namespace) -> dict[str, object]:
    round_robin = await run_strategy("round_robin", args.sessions, args.turns, args.seed)
    balanced = await run_strategy("p2c", args.sessions, args.turns, args.seed)
    return {
        "benchmark": "balancer",
        "nodes": 3,
        "slow_node_factor": SLOWDOWN,
        "nodes_are": "inference service, synthetic backend",
        "node_model": asdict(NODE),
        "num_sessions": args.sessions,
        "num_turns": args.turns,
        "p95_ttft_ratio_vs_round_robin": round(float(balanced["ttft_ms_p95"]) / float(round_robin["ttft_ms_p95"]), 4),
        "affinity_cache_hit_rate": balanced["affinity_cache_hit_rate"],
        "goals": {"p95_ttft_ratio_vs_round_robin": "<= 0.6", "affinity_cache_hit_rate": ">= 0.9"},
        "balancer": balanced,
        "round_robin": round_robin,
    }


if __name__ == "__main__":
    # Per-node health and load chatter would drown the result.
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="bench/results/balancer.json")
    cli = parser.parse_args()
    result = asyncio.run(main(cli))
    out = Path(cli.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()
