"""Prefix-aware routing benchmark: TTFT of new sessions sharing long prompt prefixes, prefix routing vs plain P2C.

Three real inference nodes on their synthetic backend
(tests/inference/client/synthetic_nodes.py: the service's own scheduler,
prefix sharing between sequences and GetLoad prefix summaries; prefill costs
``prefill_ms_per_token`` per uncached prompt token) serve new sessions, each
one of a few long shared prefixes (a system prompt, a document) plus a short
question of its own, arriving at random (exponential gaps, seeded) through
one Balancer. The same arrivals run twice on fresh nodes: with prefix-aware
routing, then with it off (``prefix_affinity_chars=0``: power of two choices
on cost). TTFT is measured by the client, from the call to the first token.

    python bench/prefix_routing.py --out bench/results/prefix_routing.json
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
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llmesh.inference.v1 import inference_pb2
from prometheus_client import REGISTRY

from bench.balancer import percentile, timed_generate
from services.inference.client import Balancer, BalancerSettings
from tests.inference.client.synthetic_nodes import SyntheticNodeSpec, synthetic_nodes
from tests.support.auth import service_identity

WORDS = ("alpha", "beta", "gamma", "delta", "policy", "tenant", "session", "vector", "cache", "token",
         "router", "budget", "ledger", "invoice", "refund", "schema", "mesh", "node", "queue", "prefix")
REASONS = ("affinity", "prefix", "p2c", "only", "round_robin")


@dataclass(frozen=True)
class Arrival:
    at_s: float
    session_id: str
    prefix_index: int
    prompt: str


def make_prefixes(num_prefixes: int, prefix_tokens: int, rng: random.Random) -> list[str]:
    """Distinct ASCII texts of ``prefix_tokens`` bytes: the synthetic tokenizer makes one token of a byte."""
    prefixes = []
    for k in range(num_prefixes):
        text = f"system prompt {k}: you are assistant number {k}; the reference follows."
        while len(text) < prefix_tokens:
            text += " " + rng.choice(WORDS)
        prefixes.append(text[:prefix_tokens])
    return prefixes


def make_arrivals(prefixes: list[str], num_sessions: int, rate_per_s: float, rng: random.Random) -> list[Arrival]:
    arrivals, at_s = [], 0.0
    for i in range(num_sessions):
        at_s += rng.expovariate(rate_per_s)
        k = rng.randrange(len(prefixes))
        suffix = f"\nuser {i}: what about item {rng.randrange(1000)}?"
        arrivals.append(Arrival(at_s, f"session-{i}", k, prefixes[k] + suffix))
    return arrivals


def _picks(addresses: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for address in addresses:
        for reason in REASONS:
            value = REGISTRY.get_sample_value("llmesh_balancer_picks_total", {"node": address, "reason": reason})
            counts[reason] += int(value or 0)
    return counts


async def run_mode(prefix_chars: int, arrivals: list[Arrival], prefix_tokens: int, node: SyntheticNodeSpec,
                   load_interval_s: float, seed: int) -> dict[str, Any]:
    """Every arrival through one Balancer on three fresh nodes; ``prefix_chars`` 0 turns prefix routing off."""
    settings = BalancerSettings(prefix_affinity_chars=prefix_chars, load_interval_s=load_interval_s,
                                health_interval_s=0.5, start_timeout_s=30.0)
    specs = [SyntheticNodeSpec(**{**asdict(node), "node_id": f"node-{i}"}) for i in range(3)]
    ttfts_ms: list[float] = []
    hits = 0
    cached_tokens = 0
    served: Counter[str] = Counter()
    async with synthetic_nodes(*specs) as nodes:
        addresses = [n.address for n in nodes]
        async with Balancer(addresses, settings, rng=random.Random(seed),
                            identity=service_identity("orchestrator")) as balancer:
            picks_before = _picks(addresses)

            async def session(arrival: Arrival, start: float) -> None:
                nonlocal hits, cached_tokens
                await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
                request = inference_pb2.GenerateRequest(
                    prompt=arrival.prompt, session_id=arrival.session_id,
                    sampling=inference_pb2.SamplingParams(max_tokens=node.max_tokens))
                ttft_ms, last = await timed_generate(balancer, request)
                ttfts_ms.append(ttft_ms)
                hits += last.usage.cached_tokens >= 0.9 * prefix_tokens
                cached_tokens += last.usage.cached_tokens
                served[last.node_id] += 1

            started = time.perf_counter()
            await asyncio.gather(*(session(a, started) for a in arrivals))
            wall_s = time.perf_counter() - started
            picks = _picks(addresses) - picks_before
    return {
        "prefix_affinity_chars": prefix_chars,
        "num_requests": len(ttfts_ms),
        "ttft_ms_p50": round(statistics.median(ttfts_ms), 2),
        "ttft_ms_p90": round(percentile(ttfts_ms, 90), 2),
        "ttft_ms_p99": round(percentile(ttfts_ms, 99), 2),
        "prefix_hit_rate": round(hits / len(ttfts_ms), 4),
        "mean_cached_tokens": round(cached_tokens / len(ttfts_ms), 1),
        "picks_by_reason": dict(picks),
        "requests_per_node": dict(sorted(served.items())),
        "wall_s": round(wall_s, 2),
    }


async def run_prefix_routing(*, num_sessions: int = 200, num_prefixes: int = 8, prefix_tokens: int = 2000,
                             arrival_rate_per_s: float = 5.0, prefill_ms_per_token: float = 0.25,
                             tokens_per_s: float = 100.0, reply_tokens: int = 4, n_seq_max: int = 16,
                             load_interval_s: float = 0.5, seed: int = 1) -> dict[str, object]:
    """Prefix routing and plain P2C on the same arrivals, each on fresh nodes; p90 TTFT side by side."""
    rng = random.Random(seed)
    prefixes = make_prefixes(num_prefixes, prefix_tokens, rng)
    arrivals = make_arrivals(prefixes, num_sessions, arrival_rate_per_s, rng)
    node = SyntheticNodeSpec(node_id="node", tokens_per_s=tokens_per_s, ttft_ms=5.0,
                             prefill_ms_per_token=prefill_ms_per_token, n_seq_max=n_seq_max, max_tokens=reply_tokens)
    routed = await run_mode(BalancerSettings.prefix_affinity_chars, arrivals, prefix_tokens, node,
                            load_interval_s, seed)
    p2c = await run_mode(0, arrivals, prefix_tokens, node, load_interval_s, seed)
    routed_p90, p2c_p90 = routed["ttft_ms_p90"], p2c["ttft_ms_p90"]
    return {
        "benchmark": "prefix_routing",
        "prefix_routing_ttft_p90_ms": routed_p90,
        "p2c_ttft_p90_ms": p2c_p90,
        "prefix_routing_ttft_p90_ratio_vs_p2c": round(routed_p90 / p2c_p90, 4),
        "prefix_hit_rate": routed["prefix_hit_rate"],
        "goals": {"prefix_routing_ttft_p90_ratio_vs_p2c": "<= 0.3", "prefix_hit_rate": ">= 0.9"},
        "nodes": 3,
        "nodes_are": "inference service, synthetic backend",
        "node_model": asdict(node),
        "num_sessions": num_sessions,
        "num_prefixes": num_prefixes,
        "prefix_tokens": prefix_tokens,
        "arrival_rate_per_s": arrival_rate_per_s,
        "load_interval_s": load_interval_s,
        "seed": seed,
        "prefix_routing": routed,
        "p2c": p2c,
    }


def main() -> None:
    # Per-node health and load chatter would drown the result.
    logging.disable(logging.WARNING)
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--prefixes", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=5.0, help="new sessions per second")
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.25)
    parser.add_argument("--n-seq-max", type=int, default=16)
    parser.add_argument("--load-interval-s", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default="")
    cli = parser.parse_args()
    result = asyncio.run(run_prefix_routing(
        num_sessions=cli.sessions, num_prefixes=cli.prefixes, prefix_tokens=cli.prefix_tokens,
        arrival_rate_per_s=cli.rate, prefill_ms_per_token=cli.prefill_ms_per_token, n_seq_max=cli.n_seq_max,
        load_interval_s=cli.load_interval_s, seed=cli.seed))
    if cli.out:
        out = Path(cli.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
