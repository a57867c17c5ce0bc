"""Inference node benchmark: batching, session reuse and fair prefill on the bundled model.

Writes one JSON file (default bench/results/inference.json). llama-cpp-python's
Llama (the serial baseline) and a bare batched decode loop (the engine's
ceiling) run in this process; the node runs as it is deployed, in a process of
its own (`python -m services.inference` on a loopback port), and this process
is its gRPC client. The baselines and the service's throughput runs alternate
over several rounds, so the ratios compare measurements taken side by side.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
from llmesh.inference.v1 import inference_pb2 as pb
from llmesh.inference.v1 import inference_pb2_grpc

from services.common.clients import make_channel
from services.common.identity import Identity
from services.gemma.model_cache import ensure_model
from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.core.types import BatchEntry, SamplingParams
from services.launcher import SERVICES, Child, Launcher
from tests.support.auth import service_identity
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
INFERENCE = next(service for service in SERVICES if service.name == "inference")

TOPICS = ["the history of bridges", "how bees make honey", "a walk in the mountains", "the rules of chess",
          "baking bread at home", "the life of a lighthouse keeper", "trains across the continent",
          "the moons of Jupiter", "a market in the morning", "writing a letter by hand", "the winter sea",
          "an old library", "learning to swim", "the first telescope", "a city at night", "rivers and deltas"]


def prompts(n: int) -> list[str]:
    return [f"Write a long essay about {TOPICS[i % len(TOPICS)]}.\n\nEssay:" for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


# -- baselines ---------------------------------------------------------------------------


def serial_llama(model_path: Path, n: int, max_tokens: int, threads: int) -> dict:
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    generated = 0
    start = time.perf_counter()
    for prompt in prompts(n):
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
        generated += out["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - start
    del llm
    return {"requests": n, "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed}


def bare_batched_loop(model_path: Path, n: int, max_tokens: int, threads: int) -> dict:
    """llama_decode over n sequences with greedy sampling and nothing else: the ceiling."""
    backend = LlamaBackend(model_path, n_ctx=4096, n_seq_max=max(n, 1), n_batch=512, n_threads=threads)
    try:
        for key in range(n):
            backend.open_sampler(key, SamplingParams())
        token_lists = [backend.tokenize(p, True, True) for p in prompts(n)]
        start = time.perf_counter()
        last = backend.decode([BatchEntry(i, tuple(t), 0, i) for i, t in enumerate(token_lists)])
        positions = [len(t) for t in token_lists]
        generated = n
        for _ in range(max_tokens - 1):
            last = backend.decode([BatchEntry(i, (last[i],), positions[i], i) for i in range(n)])
            positions = [p + 1 for p in positions]
            generated += n
        elapsed = time.perf_counter() - start
    finally:
        backend.close()
    return {"sequences": n, "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed}


# -- through the service -----------------------------------------------------------------


async def stream(stub, request, stamps: list[float] | None = None) -> dict:
    """Run one Generate; token arrival times go to ``stamps`` (kept even if cancelled)."""
    start = time.perf_counter()
    stamps = [] if stamps is None else stamps
    text = []
    last = None
    async for reply in stub.Generate(request):
        if reply.token_ids:
            stamps.extend([time.perf_counter()] * len(reply.token_ids))
        text.append(reply.text)
        last = reply
    return {"start": start, "stamps": stamps, "usage": last.usage, "end": time.perf_counter(), "text": "".join(text)}


def gen(prompt: str, max_tokens: int, session: str = "", tenant: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, session_id=session, tenant_id=tenant,
                              sampling=pb.SamplingParams(max_tokens=max_tokens))


async def flush_prompt_cache(stub, n_seq_max: int) -> None:
    """Empty every sequence, so the next run finds none of its prompts cached.

    Idle sequences keep their cells for any later prompt with the same prefix
    (the node's prompt cache); the throughput runs measure batching, not that.
    One short session per sequence takes them all (a session keeps its
    sequence), and releasing the sessions clears their cells.
    """
    sessions = [f"bench-flush-{i}" for i in range(n_seq_max)]
    await asyncio.gather(*(stream(stub, gen(f"Filler {i}.", 1, session=sid)) for i, sid in enumerate(sessions)))
    for sid in sessions:
        await stub.ReleaseSession(pb.ReleaseSessionRequest(session_id=sid))


async def concurrent_streams(stub, n: int, max_tokens: int, n_seq_max: int = 0) -> dict:
    if n_seq_max:
        await flush_prompt_cache(stub, n_seq_max)
    start = time.perf_counter()
    results = await asyncio.gather(*(stream(stub, gen(p, max_tokens)) for p in prompts(n)))
    elapsed = time.perf_counter() - start
    generated = sum(r["usage"].generated_tokens for r in results)
    return {"streams": n, "generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed,
            "prompt_tokens": sum(r["usage"].prompt_tokens for r in results),
            "cached_prompt_tokens": sum(r["usage"].cached_tokens for r in results),
            "ttft_ms": [r["usage"].ttft_ms for r in results]}


async def session_reuse(stub, turns: int = 5, document_tokens: int = 1300) -> dict:
    """TTFT of turn 5 of a chat over a long document: with the session's cache vs fully prefilled.

    Turn 1 carries the document; each later turn appends the previous answer
    and a short question, so turn 5 is ~1500 tokens of which ~40 are new.
    """
    paragraph = ("The committee met again on Tuesday to review the budget for the new bridge, the schedule "
                 "for the road works, and the letters from residents about noise and parking. ")
    text = "Document:\n" + paragraph * max(1, document_tokens // 33)
    warm_ttft = []
    for turn in range(turns):
        text += f"\nQuestion {turn + 1}: what did the committee decide about item {turn + 1}?\nAnswer:"
        result = await stream(stub, gen(text, 16, session="bench-session"))
        warm_ttft.append(result["usage"].ttft_ms)
        warm_usage = result["usage"]
        answer = result["text"]
        last_prompt = text
        text += answer
    # Another tenant shares no cells with this session's, so its run prefills everything.
    cold = await stream(stub, gen(last_prompt, 16, tenant="bench-cold"))
    await stub.ReleaseSession(pb.ReleaseSessionRequest(session_id="bench-session"))
    return {
        "turns": turns,
        "prompt_tokens_last_turn": warm_usage.prompt_tokens,
        "cached_tokens_last_turn": warm_usage.cached_tokens,
        "ttft_ms_per_turn_with_reuse": warm_ttft,
        "ttft_ms_last_turn_with_reuse": warm_ttft[-1],
        "ttft_ms_last_turn_full_prefill": cold["usage"].ttft_ms,
        "cold_cached_tokens": cold["usage"].cached_tokens,
        "ttft_ratio_reuse": warm_ttft[-1] / cold["usage"].ttft_ms,
    }


def gaps_ms(stamps: list[float], lo: float, hi: float) -> list[float]:
    return [(b - a) * 1000.0 for a, b in zip(stamps, stamps[1:], strict=False) if lo <= b <= hi]


async def long_prompt_arrival(stub, stub_count, streams: int = 4, long_tokens: int = 2000) -> dict:
    """p99 inter-token latency of running streams while a long prompt arrives, vs without it."""
    base = await asyncio.gather(*(stream(stub, gen(p, 200)) for p in prompts(streams)))
    base_gaps = [g for r in base for g in gaps_ms(r["stamps"][5:], 0, float("inf"))]

    word = "history "
    n_words = long_tokens
    count = (await stub_count.CountTokens(pb.CountTokensRequest(text=word * n_words, add_special=True))).num_tokens
    n_words = int(n_words * long_tokens / max(1, count))
    long_prompt = word * n_words
    long_count = (await stub_count.CountTokens(pb.CountTokensRequest(text=long_prompt, add_special=True))).num_tokens

    running_stamps: list[list[float]] = [[] for _ in range(streams)]
    running = [asyncio.ensure_future(stream(stub, gen(p, 1000), stamps))
               for p, stamps in zip(prompts(streams)[::-1], running_stamps, strict=True)]
    await asyncio.sleep(1.5)
    arrival = time.perf_counter()
    long_result = await stream(stub, gen(long_prompt, 4))
    first_token = long_result["stamps"][0] if long_result["stamps"] else long_result["end"]
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    window_gaps = [g for stamps in running_stamps for g in gaps_ms(stamps, arrival, first_token)]
    return {
        "streams": streams,
        "long_prompt_tokens": long_count,
        "itl_ms_p50_no_arrival": percentile(base_gaps, 50),
        "itl_ms_p99_no_arrival": percentile(base_gaps, 99),
        "itl_ms_p50_during_prefill": percentile(window_gaps, 50),
        "itl_ms_p99_during_prefill": percentile(window_gaps, 99),
        "long_prompt_ttft_ms": long_result["usage"].ttft_ms,
        "itl_ms_p95_no_arrival": percentile(base_gaps, 95),
        "itl_ms_p95_during_prefill": percentile(window_gaps, 95),
        "num_gaps_no_arrival": len(base_gaps),
        "num_gaps_during_prefill": len(window_gaps),
        "itl_p50_ratio_long_prompt": percentile(window_gaps, 50) / max(1e-9, percentile(base_gaps, 50)),
        "itl_p95_ratio_long_prompt": percentile(window_gaps, 95) / max(1e-9, percentile(base_gaps, 95)),
        "itl_p99_ratio_long_prompt": percentile(window_gaps, 99) / max(1e-9, percentile(base_gaps, 99)),
    }


# The node under test: as deployed, but with tracing off (no other run here traces either).
N_CTX = 8192
N_SEQ_MAX = 16


@contextlib.contextmanager
def service_process(model_path: Path, threads: int) -> Iterator[tuple[int, Identity]]:
    """Start ``python -m services.inference`` (the mesh launcher's way) on a free loopback port;
    yields the port, and the identity to call it with, once the node reports SERVING."""
    data_dir = Path(tempfile.mkdtemp(prefix="llmesh-inference-bench-"))
    # The node and this process share one credentials directory, as the launcher's children do.
    credentials = data_dir / "credentials"
    node = Child("inference", INFERENCE, free_port(), -1, data_dir / "logs" / "inference.log", extra_env={
        "LLMESH_INFERENCE_BACKEND": "llama", "LLMESH_INFERENCE_MODEL_PATH": str(model_path),
        "LLMESH_INFERENCE_N_CTX": str(N_CTX), "LLMESH_INFERENCE_N_SEQ_MAX": str(N_SEQ_MAX),
        "LLMESH_INFERENCE_N_THREADS": str(threads), "LLMESH_INFERENCE_N_GPU_LAYERS": "0",
        "LLMESH_INFERENCE_MAX_QUEUE": "64", "LLMESH_INFERENCE_TRACE_FILE": "",
        "LLMESH_INFERENCE_LOG_LEVEL": "WARNING", "LLMESH_CREDENTIALS_DIR": str(credentials)})
    launcher = Launcher([node], data_dir, ready_timeout_s=180)
    try:
        launcher.spawn(node)
        asyncio.run(launcher.wait_ready(node))
        yield node.port, service_identity("orchestrator", credentials)
    finally:
        launcher.stop_all()
        shutil.rmtree(data_dir, ignore_errors=True)


def node_channel(port: int, identity: Identity) -> grpc.aio.Channel:
    """A plain (untraced) channel to the node presenting ``identity``'s key on every call."""
    return make_channel(f"127.0.0.1:{port}", identity, traced=False, options=[])


async def service_round(port: int, identity: Identity, max_tokens: int,
                        stream_counts: list[int]) -> dict[int, dict]:
    """One cold run per stream count through the node."""
    async with node_channel(port, identity) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await concurrent_streams(stub, 2, 4)  # connection and first-call warm-up
        return {n: await concurrent_streams(stub, n, max_tokens, N_SEQ_MAX) for n in stream_counts}


async def service_latency(port: int, identity: Identity) -> tuple[dict, dict]:
    async with node_channel(port, identity) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        reuse = await session_reuse(stub)
        fairness = await long_prompt_arrival(stub, stub)
    return reuse, fairness


def best(runs: list[dict]) -> dict:
    return max(runs, key=lambda run: run["tokens_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "inference.json"))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    model_path = ensure_model()
    stream_counts = [1, 2, 4, 8, 16]

    serial_runs: list[dict] = []
    bare_runs: list[dict] = []
    service_runs: dict[int, list[dict]] = {n: [] for n in stream_counts}
    with service_process(model_path, args.threads) as (port, identity):
        # Rounds of serial baseline, bare loop and service, so each ratio's two sides see the same
        # background load; the best run of each side counts (other processes only ever slow a run).
        for round_index in range(args.rounds):
            print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
            serial_runs.append(serial_llama(model_path, 8, args.max_tokens, args.threads))
            bare_runs.append(bare_batched_loop(model_path, 8, args.max_tokens, args.threads))
            for n, run in asyncio.run(service_round(port, identity, args.max_tokens, stream_counts)).items():
                service_runs[n].append(run)
        reuse, fairness = asyncio.run(service_latency(port, identity))
    serial = best(serial_runs)
    raw8 = best(bare_runs)
    throughput = {n: best(runs) for n, runs in service_runs.items()}
    ttfts = [t for runs in service_runs.values() for run in runs for t in run["ttft_ms"]]
    report = {
        "model": model_path.name,
        "machine": {"cpus": os.cpu_count(), "threads": args.threads, "python": platform.python_version()},
        "max_tokens_per_stream": args.max_tokens,
        "throughput_ratio_vs_serial": throughput[8]["tokens_per_s"] / serial["tokens_per_s"],
        "throughput_ratio_vs_serial_16": throughput[16]["tokens_per_s"] / serial["tokens_per_s"],
        "batch_efficiency_vs_raw": throughput[8]["tokens_per_s"] / raw8["tokens_per_s"],
        "ttft_ratio_reuse": reuse["ttft_ratio_reuse"],
        "itl_p99_ratio_long_prompt": fairness["itl_p99_ratio_long_prompt"],
        "tokens_per_s": {str(n): run["tokens_per_s"] for n, run in throughput.items()},
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p95": percentile(ttfts, 95),
        # The node's own process (the largest child); the baselines run in this one.
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "load_average_after": os.getloadavg(),
        "rounds": args.rounds,
        "serial_llama_create_completion": serial,
        "serial_runs_tokens_per_s": [run["tokens_per_s"] for run in serial_runs],
        "bare_llama_decode_loop_8": raw8,
        "bare_runs_tokens_per_s": [run["tokens_per_s"] for run in bare_runs],
        "service_streams": {str(n): {k: v for k, v in run.items() if k != "ttft_ms"} for n, run in throughput.items()},
        "service_runs_tokens_per_s": {str(n): [run["tokens_per_s"] for run in runs]
                                      for n, runs in service_runs.items()},
        "session_reuse": reuse,
        "long_prompt_fairness": fairness,
        "goals": {"throughput_ratio_vs_serial": ">= 2.5", "batch_efficiency_vs_raw": ">= 0.9",
                  "ttft_ratio_reuse": "<= 0.1", "itl_p99_ratio_long_prompt": "<= 2.0"},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("throughput_ratio_vs_serial", "batch_efficiency_vs_raw",
                                             "ttft_ratio_reuse", "itl_p99_ratio_long_prompt", "tokens_per_s")},
                     indent=2))


if __name__ == "__main__":
    main()
