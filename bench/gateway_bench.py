"""REST layer overhead: unary JSON calls, SSE streams, OpenAI chat, API-key checks; structured outputs.

Backends are in-process fakes (tests/gateway/fakes.py) so the overhead numbers
measure the translation layer (HTTP parse, JSON <-> proto, gRPC hop, framing),
not a model. `json_schema_valid_rate` is the exception: structured-output
requests (the twenty schemas of tests/gateway/schemas.py, cycled) through the
official `openai` SDK to a real node on the bundled model, each answer parsed
and validated with `jsonschema` (goal 1.0). So is `responses_followup_ttft_ratio`:
on the bundled model with a real store, the time to the first output token of
turn 5 of a `/v1/responses` chain (`previous_response_id`, the session's KV
cache reused) over that of the same input sent cold as a new chain, measured
side by side (goal <= 0.15). Writes bench/results/gateway.json.

    python bench/gateway_bench.py [--requests 400] [--concurrency 8] [--schema-requests 100] [--chains 4]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema
import openai

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
from services.gemma.model_cache import ensure_model
from services.inference.config import Settings as InferenceSettings
from services.inference.server import build_app as build_inference
from tests.gateway.fakes import FakeAgentApp, ScriptedGenerator
from tests.gateway.schemas import SCHEMAS

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


async def structured_outputs(key: str, auth: ApiKeyAuthenticator, requests: int) -> dict:
    """Answers under response_format json_schema from the bundled model: how many parse and validate."""
    node_settings = InferenceSettings(port=0, model_path=str(ensure_model()), n_ctx=4096, n_seq_max=4, n_gpu_layers=0)
    gate = asyncio.Semaphore(4)
    failures: list[str] = []
    async with running_service(build_inference(node_settings), node_settings) as node:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",)), authenticator=auth)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client:

                async def one(i: int) -> bool:
                    schema = SCHEMAS[i % len(SCHEMAS)]
                    async with gate:
                        reply = await client.chat.completions.create(
                            model="gemma-3-270m", max_tokens=160, temperature=0.7, seed=i,
                            messages=[{"role": "user", "content": f"Give example number {i}."}],
                            response_format={"type": "json_schema",
                                             "json_schema": {"name": "answer", "schema": schema, "strict": True}})
                    text = reply.choices[0].message.content or ""
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        return True
                    except (ValueError, jsonschema.ValidationError) as exc:
                        failures.append(f"schema {i % len(SCHEMAS)}: {exc.__class__.__name__}: {text[:120]!r}")
                        return False

                start = time.perf_counter()
                valid = await asyncio.gather(*(one(i) for i in range(requests)))
                wall = time.perf_counter() - start
    return {"json_schema_valid_rate": round(sum(valid) / len(valid), 4) if valid else 0.0, "requests": requests,
            "schemas": len(SCHEMAS), "wall_s": round(wall, 1), "failures": failures[:10], "goal": 1.0,
            "note": "bundled model on CPU, temperature 0.7 with a seed per request, 4 at a time"}


# A long system prompt, as agent sessions have: the part of a chain's prompt its follow-ups need not prefill again.
RESPONSES_INSTRUCTIONS = "You are a careful assistant. " + " ".join(
    f"Rule {i}: answer briefly, stay on the topic of the conversation, and never invent facts." for i in range(60))
RESPONSES_TURNS = ("Name a fruit.", "Name another one.", "Which is sweeter?", "Name a vegetable.", "Say goodbye.")


async def _first_token_s(client: openai.AsyncOpenAI, **kwargs) -> tuple[float, object]:
    """Seconds from the request to its first output text, and the finished response."""
    start = time.perf_counter()
    first = None
    final = None
    async for event in await client.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta" and first is None:
            first = time.perf_counter() - start
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    return (first if first is not None else time.perf_counter() - start), final


async def responses_followup(key: str, cold_key: str, auth: ApiKeyAuthenticator, chains: int,
                             data_dir: Path) -> dict:
    """Turn 5 of a Responses chain against the same input sent cold, each chain then its cold twin.

    The twin is sent by another tenant (``cold_key``): a node shares a prefix's cells only
    within a tenant, so the same tenant's new chain would not be cold.
    """
    from services.store.config import Settings as StoreSettings
    from services.store.server import build_app as build_store

    node_settings = InferenceSettings(port=0, model_path=str(ensure_model()), n_ctx=4096, n_seq_max=4, n_gpu_layers=0)
    store_settings = StoreSettings(port=0, data_dir=str(data_dir), sqlite_synchronous="NORMAL")
    followups: list[float] = []
    colds: list[float] = []
    cached: list[int] = []
    inputs: list[int] = []
    same = 0
    common = dict(model="gemma-3-270m", instructions=RESPONSES_INSTRUCTIONS, temperature=0, max_output_tokens=16)
    async with running_service(build_inference(node_settings), node_settings) as node, \
            running_service(build_store(store_settings), store_settings) as store:
        app = build_app(Settings(port=0, inference_nodes=(f"127.0.0.1:{node.port}",),
                                 store_target=f"127.0.0.1:{store.port}"), authenticator=auth)
        async with running_gateway(app) as url:
            async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=key, max_retries=0) as client, \
                    openai.AsyncOpenAI(base_url=url + "/v1", api_key=cold_key, max_retries=0) as cold_client:
                for chain in range(chains):
                    previous = None
                    history: list[dict] = []
                    for turn, text in enumerate(RESPONSES_TURNS):
                        text = f"{text} (chain {chain})" if turn == 0 else text
                        ttft, response = await _first_token_s(client, input=text, previous_response_id=previous,
                                                              **common)
                        history += [{"role": "user", "content": text},
                                    {"role": "assistant", "content": response.output_text}]
                        previous = response.id
                    followups.append(ttft)
                    cached.append(response.usage.input_tokens_details.cached_tokens)
                    inputs.append(response.usage.input_tokens)
                    cold_ttft, cold = await _first_token_s(cold_client, input=history[:-1], **common)
                    colds.append(cold_ttft)
                    same += cold.output_text == response.output_text
    ratio = statistics.median(followups) / statistics.median(colds)
    return {"responses_followup_ttft_ratio": round(ratio, 4), "goal": 0.15, "goal_met": ratio <= 0.15,
            "chains": chains, "turn5_ttft_ms_p50": round(statistics.median(followups) * 1000, 1),
            "cold_ttft_ms_p50": round(statistics.median(colds) * 1000, 1),
            "turn5_input_tokens_p50": statistics.median(inputs), "turn5_cached_tokens_p50": statistics.median(cached),
            "turn5_same_answer_as_cold": f"{same}/{chains}",
            "note": "bundled model on CPU, one at a time; each chain's turn 5 then the same input as a new chain"}


async def main(args: argparse.Namespace) -> dict:
    key, record = generate_api_key("bench")
    cold_key, cold_record = generate_api_key("bench-cold")
    auth = ApiKeyAuthenticator(ApiKeyStore([record, cold_record]), FailedAttemptLimiter())
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

    if args.schema_requests:
        results["structured_outputs"] = await structured_outputs(key, auth, args.schema_requests)
        results["json_schema_valid_rate"] = results["structured_outputs"]["json_schema_valid_rate"]
    if args.chains:
        with tempfile.TemporaryDirectory(prefix="bench-responses-") as data_dir:
            results["responses"] = await responses_followup(key, cold_key, auth, args.chains,
                                                              Path(data_dir))
        results["responses_followup_ttft_ratio"] = results["responses"]["responses_followup_ttft_ratio"]
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
    parser.add_argument("--schema-requests", type=int, default=100,
                        help="structured-output requests on the bundled model (0 skips them)")
    parser.add_argument("--chains", type=int, default=4,
                        help="five-turn /v1/responses chains on the bundled model, each against a cold twin (0 skips)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway.json"))
    args = parser.parse_args()
    output = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))
