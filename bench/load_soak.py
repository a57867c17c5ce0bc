"""S4 soak (`make soak`): steady mixed load for a long time; RSS and open files must stay flat.

Runs the S1 client mix at a fixed concurrency against the whole mesh (synthetic
inference) and samples the resident memory and file-descriptor count of every
service process. "Flat" compares the mean of the last quarter of the samples
with the mean of the second quarter (the first quarter is warm-up: caches and
pools fill there). Results: bench/results/soak.json. On demand, not in CI.

    python bench/load_soak.py --minutes 30 [--concurrency 50]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import psutil

from bench.load import parse_args as load_args
from bench.load import s1_level
from bench.load_mesh import MeshOptions, running_mesh

# What each round keeps (the RSS and fd samples are kept beside them).
ROUND_FIELDS = ("throughput_ops_per_s", "error_rate", "errors", "error_samples", "overhead_ms_p95",
                "turn_ms_p50", "tool_batch_ms_p50")
# Growth of the late-run mean over the early-run mean that still counts as flat.
RSS_GROWTH_LIMIT = 0.10
FD_GROWTH_LIMIT = 5


def sample(pids: dict[str, int]) -> dict[str, dict[str, float]]:
    out = {}
    for name, pid in pids.items():
        try:
            proc = psutil.Process(pid)
            out[name] = {"rss_mb": proc.memory_info().rss / 2**20, "fds": proc.num_fds()}
        except psutil.NoSuchProcess:
            out[name] = {"rss_mb": float("nan"), "fds": float("nan")}
    return out


def verdict(samples: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float | bool]]:
    n = len(samples)
    early = samples[n // 4: max(n // 2, n // 4 + 1)]
    late = samples[-max(1, n // 4):]
    out = {}
    for name in samples[0]:
        rss_early = statistics.mean(s[name]["rss_mb"] for s in early)
        rss_late = statistics.mean(s[name]["rss_mb"] for s in late)
        fds_early = statistics.mean(s[name]["fds"] for s in early)
        fds_late = statistics.mean(s[name]["fds"] for s in late)
        out[name] = {"rss_mb_early": round(rss_early, 1), "rss_mb_late": round(rss_late, 1),
                     "fds_early": round(fds_early, 1), "fds_late": round(fds_late, 1),
                     "flat": rss_late <= rss_early * (1 + RSS_GROWTH_LIMIT) and fds_late <= fds_early + FD_GROWTH_LIMIT}
    return out


async def soak(minutes: float, concurrency: int, sample_s: float) -> dict:
    opts = load_args([])
    samples: list[dict[str, dict[str, float]]] = []
    rounds = []
    async with running_mesh(MeshOptions(nodes=2, tokens_per_s=opts.tokens_per_s)) as mesh:
        pids = mesh.pids()
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            result = await s1_level(mesh, concurrency, min(sample_s, max(1.0, deadline - time.monotonic())), opts)
            rounds.append({k: result[k] for k in ROUND_FIELDS})
            samples.append(sample(pids))
            print(f"{len(samples)}: {rounds[-1]} {samples[-1]}", flush=True)
    processes = verdict(samples) if len(samples) >= 4 else {}
    return {"benchmark": "soak", "minutes": minutes, "concurrency": concurrency, "num_samples": len(samples),
            "flat": bool(processes) and all(p["flat"] for p in processes.values()), "processes": processes,
            "error_rate_max": max((r["error_rate"] for r in rounds), default=None),
            "throughput_ops_per_s_by_round": [r["throughput_ops_per_s"] for r in rounds],
            "errors": {code: sum(r["errors"].get(code, 0) for r in rounds)
                       for code in sorted({c for r in rounds for c in r["errors"]})},
            "rounds": rounds,
            "samples": samples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args()
    result = asyncio.run(soak(args.minutes, args.concurrency, args.sample_s))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: flat={result['flat']}")


if __name__ == "__main__":
    main()
