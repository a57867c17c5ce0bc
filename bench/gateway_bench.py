"""REST layer overhead: unary JSON calls, SSE streams, OpenAI chat, API-key checks.

Backends are in-process fakes (tests/gateway/fakes.py) so the numbers measure
the translation layer (HTTP parse, JSON <-> proto, gRPC hop, framing), not a
model. Writes bench/results/gateway.json.

    python bench/gateway_bench.py [--requests 400] [--concurrency 8]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import httpx

from services.common.auth import (
    DEFAULT_SCRYPT_N,
    ApiKeyAuthenticator,
    ApiKeyStore,
    FailedAttemptLimiter,
    generate_api_key,
)
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from tests.gateway.fakes import FakeAgentApp, ScriptedGenerator

ROOT = Path(__file__).resolve().parents[1]


def summarize(samples_s: list[float], wall_s: float) -> dict:
    ms = sorted(s * 1000 for s in samples_s)
    return {"num_requests": len(ms), "throughput_rps": round(len(ms) / wall_s, 1),
            "p50_ms": round(statistics.median(ms), 3), "p99_ms": round(ms[int(len(ms) * 0.99) - 1], 3),
            "mean_ms": round(statistics.fmean(ms), 3)}


async def timed_many(n: int, concurrency: int, one) -> dict:
    samples: list[float] = []
    queue = iter(range(n))

    async def worker() -> None:
        for _ in queue:
            start = time.perf_counter()
            await one()
            samples.append(time.perf_counter() - start)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return summarize(samples, time.perf_counter() - start)


async def main(args: argparse.Namespace) -> dict:
    key, record = generate_api_key("bench")
    auth = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter())
    agent = FakeAgentApp()
    agent.service.step_s = 0.0
    results: dict = {}
    async with running_service(agent, ServerSettings(port=0)) as svc:
        app = build_app(Settings(port=0, orchestrator_target=f"127.0.0.1:{svc.port}"), authenticator=auth,
                        generator=ScriptedGenerator(" ".join(f"w{i}" for i in range(32))))
        async with running_gateway(app) as url:
            headers = {"Authorization": f"Bearer {key}"}
            limits = httpx.Limits(max_connections=args.concurrency * 2)
            async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as client:
                session_id = (await client.post("/v1/sessions", json={"title": "bench"})).json()["session"]["sessionId"]

                async def get_session() -> None:
                    reply = await client.get(f"/v1/sessions/{session_id}")
                    assert reply.status_code == 200, reply.text

                await timed_many(20, 2, get_session)  # warm-up
                results["unary_get_session"] = await timed_many(args.requests, args.concurrency, get_session)

                message = " ".join(f"t{i}" for i in range(args.stream_events))
                first_event: list[float] = []

                async def run_stream() -> None:
                    created = await client.post("/v1/sessions", json={"title": "s"})
                    sid = created.json()["session"]["sessionId"]
                    start = time.perf_counter()
                    seen = 0
                    async with client.stream("POST", f"/v1/sessions/{sid}:run", json={"userMessage": message}) as r:
                        async for line in r.aiter_lines():
                            if line.startswith("id: "):
                                if seen == 0:
                                    first_event.append(time.perf_counter() - start)
                                seen += 1
                    assert seen == args.stream_events + 2, seen

                stream_stats = await timed_many(args.streams, min(args.concurrency, 4), run_stream)
                stream_stats["events_per_stream"] = args.stream_events + 2
                stream_stats["first_event_p50_ms"] = round(statistics.median(first_event) * 1000, 3)
                stream_stats["events_per_s"] = round(
                    stream_stats["throughput_rps"] * stream_stats["events_per_stream"], 1)
                results["sse_run_stream"] = stream_stats

                async def chat() -> None:
                    reply = await client.post("/v1/chat/completions", json={
                        "model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 32})
                    assert reply.status_code == 200, reply.text

                results["openai_chat_non_stream_scripted"] = await timed_many(
                    args.requests // 2, args.concurrency, chat)

    # What the slow KDF costs when a key is first seen, and what the cache saves afterwards.
    fresh = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter())
    start = time.perf_counter()
    await fresh.authenticate(f"Bearer {key}", "bench")
    uncached = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(1000):
        await fresh.authenticate(f"Bearer {key}", "bench")
    cached = (time.perf_counter() - start) / 1000
    fresh.close()
    auth.close()
    results["api_key_check"] = {"scrypt_n": DEFAULT_SCRYPT_N, "first_check_ms": round(uncached * 1000, 2),
                                "cached_check_us": round(cached * 1e6, 2)}
    results["config"] = {"requests": args.requests, "concurrency": args.concurrency, "streams": args.streams,
                         "python": platform.python_version(), "machine": platform.machine(),
                         "note": "fake backends in-process; measures the REST layer only"}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--streams", type=int, default=40)
    parser.add_argument("--stream-events", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()
    output = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))
