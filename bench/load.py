"""Load scenarios S1-S3 against the whole mesh on loopback (`make bench-load`).

S1  concurrent agent streams mixing chat turns (orchestrator Run, synthetic
    inference at a fixed token rate) and tool batches (tools service), swept
    over concurrency: throughput, error rate, non-LLM overhead percentiles.
S2  idle and active WatchEvents subscribers on the store while the active
    sessions receive events: store event reads per second vs commits.
S3  a burst of queued tasks claimed and acked by competing workers:
    duplicates, losses and throughput per second.

Every phase is bounded in time. Results: bench/results/load.json.
    python bench/load.py [--quick] [--scenarios s1,s2,s3] [--out PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as apb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc
from llmesh.store.v1 import store_pb2 as spb
from llmesh.store.v1 import store_pb2_grpc
from llmesh.tools.v1 import tools_pb2 as tpb
from llmesh.tools.v1 import tools_pb2_grpc

from bench.load_mesh import Mesh, MeshOptions, running_mesh
from services.common.clients import make_channel
from services.common.identity import Identity

TENANT = "load"


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def summary_ms(values: list[float], prefix: str) -> dict[str, float]:
    return {f"{prefix}_ms_p50": round(percentile(values, 50), 2), f"{prefix}_ms_p95": round(percentile(values, 95), 2),
            f"{prefix}_ms_p99": round(percentile(values, 99), 2)}


def _channel(mesh: Mesh, service: str, identity: Identity,
             options: list[tuple[str, Any]] | None = None) -> grpc.aio.Channel:
    """A plain (untraced) channel to ``service`` presenting ``identity``'s key on every call."""
    return make_channel(mesh.target(service), identity, traced=False, options=options or [])


# -- S1 ----------------------------------------------------------------------------------------------------------------

async def _chat_turn(agent: Any, session_id: str, max_tokens: int, tokens_per_s: float) -> tuple[float, float]:
    """(wall ms, non-LLM overhead ms) of one turn."""
    start = time.perf_counter()
    last = None
    async for reply in agent.Run(apb.RunRequest(tenant_id=TENANT, session_id=session_id, user_message="hello there",
                                                options=apb.RunOptions(max_steps=1, max_tokens=max_tokens,
                                                                       tool_choice="none"))):
        last = reply.event
    wall_ms = (time.perf_counter() - start) * 1000
    if last is None or not last.HasField("final"):
        raise RuntimeError(f"turn ended without final: {last}")
    # The synthetic node emits one token per 1/tokens_per_s; the rest is the mesh.
    llm_ms = last.final.usage.generated_tokens * 1000.0 / tokens_per_s
    return wall_ms, max(0.0, wall_ms - llm_ms)


async def _tool_batch(tools: Any, session_id: str) -> float:
    start = time.perf_counter()
    reply = await tools.ExecuteTools(tpb.ExecuteToolsRequest(
        tenant_id=TENANT, session_id=session_id, role="developer",
        calls=[tpb.ToolCall(call_id="a", name="fs_list", arguments_json='{"path": "."}'),
               tpb.ToolCall(call_id="b", name="shell_exec", arguments_json='{"command": "true"}')]), timeout=30)
    bad = [r for r in reply.results if r.status != tpb.TOOL_STATUS_OK]
    if bad:
        raise RuntimeError(f"tool call failed: {bad[0].error_reason} {bad[0].error_message}")
    return (time.perf_counter() - start) * 1000


async def s1_level(mesh: Mesh, concurrency: int, duration_s: float, opts: argparse.Namespace) -> dict[str, Any]:
    # Turns as a client of the tenant; tool batches as the orchestrator would send them.
    async with _channel(mesh, "orchestrator", mesh.client_identity(TENANT)) as ach, \
            _channel(mesh, "tools", mesh.service_identity("orchestrator")) as tch:
        agent = orchestrator_pb2_grpc.AgentServiceStub(ach)
        tools = tools_pb2_grpc.ToolServiceStub(tch)
        # A key's first call costs a KDF on the service, one per concurrent first call: not timed.
        await tools.ListTools(tpb.ListToolsRequest(page_size=1))
        sessions = await asyncio.gather(*(agent.CreateSession(apb.CreateSessionRequest(tenant_id=TENANT))
                                          for _ in range(concurrency)))
        walls: list[float] = []
        overheads: list[float] = []
        tool_ms: list[float] = []
        errors: dict[str, int] = {}
        error_samples: dict[str, str] = {}
        deadline = time.monotonic() + duration_s
        rng = random.Random(concurrency)

        async def client(session_id: str) -> None:
            while time.monotonic() < deadline:
                try:
                    if rng.random() < opts.tool_fraction:
                        tool_ms.append(await _tool_batch(tools, session_id))
                    else:
                        wall, overhead = await _chat_turn(agent, session_id, opts.max_tokens, opts.tokens_per_s)
                        walls.append(wall)
                        overheads.append(overhead)
                except (grpc.aio.AioRpcError, RuntimeError) as exc:
                    key = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else "BAD_REPLY"
                    errors[key] = errors.get(key, 0) + 1
                    error_samples.setdefault(key, str(exc)[-400:])
                    await asyncio.sleep(0.05)  # do not spin on a failing mesh

        started = time.monotonic()
        await asyncio.gather(*(client(s.session.session_id) for s in sessions))
        elapsed = time.monotonic() - started
    num_ok = len(walls) + len(tool_ms)
    num_errors = sum(errors.values())
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "num_turns": len(walls),
            "num_tool_batches": len(tool_ms), "throughput_ops_per_s": round(num_ok / elapsed, 1),
            "turns_per_s": round(len(walls) / elapsed, 1),
            "error_rate": round(num_errors / max(1, num_ok + num_errors), 4),
            "errors": errors, "error_samples": error_samples, **summary_ms(walls, "turn"),
            **summary_ms(overheads, "overhead"), **summary_ms(tool_ms, "tool_batch")}


async def scenario_s1(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    sweep = []
    for level in opts.s1_levels:
        sweep.append(await s1_level(mesh, level, opts.s1_seconds, opts))
        print(f"S1 c={level}: {sweep[-1]['throughput_ops_per_s']} ops/s, errors {sweep[-1]['error_rate']}, "
              f"overhead p95 {sweep[-1]['overhead_ms_p95']} ms", flush=True)
    top = sweep[-1]
    return {"sweep": sweep, "concurrency": top["concurrency"], "error_rate": top["error_rate"],
            "overhead_ms_p95": top["overhead_ms_p95"], "overhead_ms_p50": top["overhead_ms_p50"],
            "tokens_per_s_per_stream": opts.tokens_per_s, "max_tokens": opts.max_tokens,
            "tool_fraction": opts.tool_fraction,
            "note": "chat turns go through the orchestrator; tool batches go to the tools service directly "
                    "(the synthetic node cannot write tool calls); overhead = turn wall time - tokens / rate"}


# -- S2 ----------------------------------------------------------------------------------------------------------------

async def scenario_s2(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    # Subscribers spread over several connections, as many clients would be
    # (one HTTP/2 connection per few hundred streams).
    channels = [_channel(mesh, "store", mesh.service_identity("orchestrator"),
                         options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(opts.s2_channels)]
    stubs = [store_pb2_grpc.StoreServiceStub(c) for c in channels]
    try:
        return await _s2_run(mesh, opts, stubs)
    finally:
        for channel in channels:
            await channel.close()


async def _s2_run(mesh: Mesh, opts: argparse.Namespace, stubs: list[Any]) -> dict[str, Any]:
    num_idle, num_active = opts.s2_idle, opts.s2_active
    store = stubs[0]
    await store.ListSessions(spb.ListSessionsRequest(tenant_id=TENANT, page_size=1))  # the key's KDF, once
    ids = [f"w{i}" for i in range(num_idle + num_active)]
    for i in range(0, len(ids), 200):
        await asyncio.gather(*(store.CreateSession(spb.CreateSessionRequest(tenant_id=TENANT, session_id=s))
                               for s in ids[i:i + 200]))
    active = ids[:num_active]
    delivered = 0
    closing = False
    # Streams that ended before the bench closed them, by status: a lost
    # subscriber must show up in the result, never vanish silently.
    watch_failures: Counter[str] = Counter()
    watches: list[Any] = []

    async def follow(call: Any) -> None:
        nonlocal delivered
        try:
            async for _ in call:
                delivered += 1
        except grpc.aio.AioRpcError as exc:
            if not closing:
                watch_failures[exc.code().name] += 1

    followers: list[asyncio.Task] = []
    # Open in waves, each waited for: grpc core cancels calls that queue past
    # `grpc.server.max_pending_requests` (1000) before the Python server takes
    # them, so thousands of streams opened at once lose about a third (CANCELLED).
    open_start = time.monotonic()
    for wave in range(0, len(ids), opts.s2_open_wave):
        for i in range(wave, min(wave + opts.s2_open_wave, len(ids))):
            call = stubs[i % len(stubs)].WatchEvents(spb.WatchEventsRequest(tenant_id=TENANT, session_id=ids[i]))
            watches.append(call)
            followers.append(asyncio.create_task(follow(call)))
        # Every watch of the wave open and past its first read before the next wave.
        while mesh.metric("llmesh_store_event_watchers", "store") + sum(watch_failures.values()) < len(watches):
            if time.monotonic() - open_start > opts.s2_open_timeout_s:
                break
            await asyncio.sleep(0.2)
    open_s = time.monotonic() - open_start
    await asyncio.sleep(opts.s2_settle_s)
    reads_before = mesh.metric("llmesh_store_event_reads_total", "store")
    watchers = mesh.metric("llmesh_store_event_watchers", "store")
    idle_start = time.monotonic()
    await asyncio.sleep(opts.s2_idle_s)
    idle_reads_per_s = (mesh.metric("llmesh_store_event_reads_total", "store") - reads_before) / (
        time.monotonic() - idle_start)
    reads_before = mesh.metric("llmesh_store_event_reads_total", "store")
    delivered_before = delivered
    appended = 0
    start = time.monotonic()
    deadline = start + opts.s2_seconds
    while time.monotonic() < deadline:
        tick = time.monotonic()
        replies = await asyncio.gather(*(store.AppendEvents(spb.AppendEventsRequest(
            tenant_id=TENANT, session_id=s, events=[spb.Event(type="token", payload=b"x")])) for s in active))
        appended += sum(len(r.seqs) for r in replies)
        await asyncio.sleep(max(0.0, opts.s2_interval_s - (time.monotonic() - tick)))
    await asyncio.sleep(0.5)  # let the last commits reach their watchers
    elapsed = time.monotonic() - start
    reads = mesh.metric("llmesh_store_event_reads_total", "store") - reads_before
    closing = True
    for w in watches:
        w.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    return {"idle_subscribers": num_idle, "active_subscribers": num_active, "watchers_seen_by_store": watchers,
            "watch_failures": dict(watch_failures), "open_wave": opts.s2_open_wave,
            "seconds_to_open_all_watches": round(open_s, 1),
            "seconds": round(elapsed, 1), "events_appended": appended,
            "events_per_s": round(appended / elapsed, 1),
            "events_delivered": delivered - delivered_before,
            "store_reads_per_s": round(reads / elapsed, 1),
            "store_reads_per_s_idle": round(idle_reads_per_s, 1),
            "store_reads_per_committed_event": round(reads / max(1, appended), 3),
            "note": "reads counted by the store (llmesh_store_event_reads_total); a watcher is woken by commits; "
                    "appends by other store replicas are found by one shared query per watch_recheck_ms"}


# -- S3 ----------------------------------------------------------------------------------------------------------------

async def scenario_s3(mesh: Mesh, opts: argparse.Namespace) -> dict[str, Any]:
    num_tasks, num_workers = opts.s3_tasks, opts.s3_workers
    async with _channel(mesh, "store", mesh.service_identity("orchestrator")) as ch:
        store = store_pb2_grpc.StoreServiceStub(ch)
        # The key's first call costs a KDF on the store, one per concurrent first call: not timed.
        await store.ListSessions(spb.ListSessionsRequest(tenant_id=TENANT, page_size=1))
        queue = f"s3-{int(time.time())}"
        t0 = time.monotonic()
        for i in range(0, num_tasks, 500):
            await asyncio.gather(*(store.EnqueueTask(spb.EnqueueTaskRequest(
                request_id=f"{queue}-{n}", tenant_id=TENANT, queue=queue, payload_json=json.dumps({"n": n})))
                for n in range(i, min(num_tasks, i + 500))))
        enqueue_s = time.monotonic() - t0
        acked: dict[str, str] = {}
        duplicates = 0
        per_second: dict[int, int] = {}
        start = time.monotonic()
        deadline = start + opts.s3_timeout_s

        async def worker(worker_id: str) -> None:
            nonlocal duplicates
            idle_rounds = 0
            while time.monotonic() < deadline and len(acked) < num_tasks:
                claimed = await store.ClaimTasks(spb.ClaimTasksRequest(queue=queue, worker_id=worker_id,
                                                                       max_tasks=16, lease_ms=30_000))
                if not claimed.tasks:
                    idle_rounds += 1
                    if idle_rounds > 50:
                        return
                    await asyncio.sleep(0.02)
                    continue
                idle_rounds = 0
                for task in claimed.tasks:
                    if task.task_id in acked:
                        duplicates += 1
                    await store.AckTask(spb.AckTaskRequest(task_id=task.task_id, lease_token=task.lease_token,
                                                           result_json="{}"))
                    acked.setdefault(task.task_id, worker_id)
                    second = int(time.monotonic() - start)
                    per_second[second] = per_second.get(second, 0) + 1

        await asyncio.gather(*(worker(f"worker-{i}") for i in range(num_workers)))
        elapsed = time.monotonic() - start
    full_seconds = [per_second.get(s, 0) for s in range(int(elapsed))] or [len(acked)]
    mean = statistics.mean(full_seconds)
    return {"tasks": num_tasks, "workers": num_workers, "enqueue_seconds": round(enqueue_s, 1),
            "seconds": round(elapsed, 1), "tasks_done": len(acked), "tasks_lost": num_tasks - len(acked),
            "duplicates": duplicates, "tasks_per_s": round(len(acked) / elapsed, 1),
            "tasks_per_s_by_second": full_seconds,
            "throughput_cv": round(statistics.pstdev(full_seconds) / mean, 3) if mean else None}


async def main_async(opts: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"benchmark": "load", "python": platform.python_version(), "machine": platform.machine(),
                              "quick": opts.quick}
    mesh_options = MeshOptions(nodes=opts.nodes, tokens_per_s=opts.tokens_per_s)
    async with running_mesh(mesh_options) as mesh:
        if "s1" in opts.scenarios:
            result["s1"] = await scenario_s1(mesh, opts)
        if "s2" in opts.scenarios:
            result["s2"] = await scenario_s2(mesh, opts)
            print(f"S2: {result['s2']['store_reads_per_s']} reads/s for {result['s2']['events_per_s']} events/s",
                  flush=True)
        if "s3" in opts.scenarios:
            result["s3"] = await scenario_s3(mesh, opts)
            print(f"S3: {result['s3']['tasks_done']} done, {result['s3']['duplicates']} duplicates", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/load.json"))
    parser.add_argument("--scenarios", default="s1,s2,s3")
    parser.add_argument("--quick", action="store_true", help="small counts and short phases (smoke run)")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--tokens-per-s", type=float, default=50.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--tool-fraction", type=float, default=0.3)
    opts = parser.parse_args(argv)
    opts.scenarios = set(opts.scenarios.split(","))
    quick = opts.quick
    opts.s1_levels = [5, 20] if quick else [10, 50, 150, 300]
    opts.s1_seconds = 5.0 if quick else 15.0
    opts.s2_idle, opts.s2_active = (300, 50) if quick else (3000, 500)
    opts.s2_settle_s, opts.s2_idle_s = (1.0, 3.0) if quick else (2.0, 5.0)
    opts.s2_open_timeout_s = 30.0 if quick else 120.0
    opts.s2_channels = 2 if quick else 16
    # Streams opened per wave; below the store's pending-call limit (see _s2_run).
    opts.s2_open_wave = 250
    opts.s2_seconds, opts.s2_interval_s = (4.0, 0.5) if quick else (15.0, 1.0)
    opts.s3_tasks, opts.s3_workers = (1000, 8) if quick else (10_000, 16)
    opts.s3_timeout_s = 60.0 if quick else 240.0
    return opts


def main() -> None:
    opts = parse_args()
    result = asyncio.run(main_async(opts))
    if opts.out.exists() and opts.scenarios != {"s1", "s2", "s3"}:
        # A partial run updates its scenarios and keeps the others' last results.
        result = {**json.loads(opts.out.read_text()), **result}
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {opts.out}")


if __name__ == "__main__":
    main()
