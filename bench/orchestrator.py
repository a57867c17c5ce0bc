"""Orchestrator benchmark: `make bench-orchestrator` -> bench/results/orchestrator.json.

overhead_ms_p50/p95: wall time of a turn (Run call to final event, as a gRPC
client sees it) minus the time spent inside inference and tools. A turn is
two model steps with two parallel tool calls in between; the model is
scripted (instant) and the tools are fakes with a fixed delay, both wrapped
so the time inside them is measured exactly and subtracted. The store is the
real store service (SQLite) when it is implemented, else the in-memory one,
as the JSON says.

ttfb_overhead_ratio: time from the Run call to the first token event, over
the engine's own TTFT for that request (usage.ttft_ms of the inference
service, or of the in-process llama.cpp adapter when the service is not
implemented), on the bundled Gemma 3 270M, fresh session each sample.

With --failover-only (`make bench-orchestrator-failover` ->
bench/results/orchestrator_failover.json): the orchestrator reaches two
synthetic inference nodes through the client-side balancer (setting
`inference_nodes`); per round, a session runs turns on its node, that node
is stopped, and the next turn is timed: `failover_turn_ms` against
`sticky_turn_ms` is what a user waits extra when the session's node dies.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc
from llmesh.store.v1 import store_pb2, store_pb2_grpc

from services.common.clients import make_channel
from services.common.identity import Identity
from services.common.runtime import running_service
from services.orchestrator.adapters.grpc_inference import GrpcInference
from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.config import Settings
from services.orchestrator.server import build_app
from tests.orchestrator.fakes import FakePolicy, FakeTools, ScriptedInference, call
from tests.support.auth import client_identity, service_identity

TENANT = "bench"


class TimedInference:
    """Counts only the time spent inside the wrapped port, not in its consumer."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.busy_s = 0.0
        self.ttft_ms: list[float] = []

    async def tokenize(self, text, *, model="", add_special=False):
        started = time.perf_counter()
        try:
            return await self.inner.tokenize(text, model=model, add_special=add_special)
        finally:
            self.busy_s += time.perf_counter() - started

    async def context_size(self, model=""):
        started = time.perf_counter()
        try:
            return await self.inner.context_size(model)
        finally:
            self.busy_s += time.perf_counter() - started

    async def generate(self, request):
        stream = self.inner.generate(request)
        try:
            while True:
                started = time.perf_counter()
                try:
                    chunk = await stream.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self.busy_s += time.perf_counter() - started
                if chunk.usage is not None:
                    self.ttft_ms.append(chunk.ttft_ms)
                yield chunk
        finally:
            await stream.aclose()


class TimedTools(FakeTools):
    def __init__(self) -> None:
        super().__init__(delay_s=0.005)
        self.busy_s = 0.0

    async def execute_tools(self, **kwargs):
        started = time.perf_counter()
        try:
            return await super().execute_tools(**kwargs)
        finally:
            self.busy_s += time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def _channel(target: str, identity: Identity) -> grpc.aio.Channel:
    """A plain (untraced) channel presenting ``identity``'s key on every call, as every caller in the mesh does."""
    return make_channel(target, identity, traced=False, options=[])


async def _implemented(target: str, probe) -> bool:
    # The probes stand in for the orchestrator (the store's and the node's caller).
    async with _channel(target, service_identity("orchestrator")) as channel:
        try:
            await probe(channel)
        except grpc.aio.AioRpcError as err:
            return err.code() != grpc.StatusCode.UNIMPLEMENTED
    return True


@contextlib.asynccontextmanager
async def store_service(data_dir: Path):
    from services.store.config import Settings as StoreSettings
    from services.store.server import build_app as build_store

    settings = StoreSettings(port=0, data_dir=str(data_dir), sqlite_synchronous="NORMAL")
    async with running_service(build_store(settings), settings) as svc:
        target = f"127.0.0.1:{svc.port}"
        ok = await _implemented(target, lambda ch: store_pb2_grpc.StoreServiceStub(ch).GetSession(
            store_pb2.GetSessionRequest(tenant_id=TENANT, session_id="probe")))
        yield target if ok else ""


async def measure_overhead(num_turns: int, store_target: str) -> dict:
    tools = TimedTools()
    answer = " ".join(f"w{i}" for i in range(20))
    reply = call("fs_read", path="a.txt") + "\n" + call("fs_list", path=".")
    inference = TimedInference(ScriptedInference([reply, answer] * (num_turns + 2), n_ctx=32768))
    settings = Settings(port=0, store_target=store_target, max_workers=0, event_batch_ms=5)
    ports = dict(inference=inference, tools=tools, policy=FakePolicy(tools))
    if not store_target:
        ports["store"] = MemoryStore()
    overheads = []
    async with running_service(build_app(settings, **ports), settings) as svc:
        async with _channel(svc.address, client_identity(TENANT)) as channel:
            stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
            session = (await stub.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT))).session
            for turn in range(num_turns + 2):
                inference.busy_s = tools.busy_s = 0.0
                started = time.perf_counter()
                async for _ in stub.Run(pb.RunRequest(request_id=f"t{turn}", tenant_id=TENANT,
                                                      session_id=session.session_id, user_message=f"turn {turn}")):
                    pass
                total = time.perf_counter() - started
                if turn >= 2:  # the first turns warm caches and connections
                    overheads.append((total - inference.busy_s - tools.busy_s) * 1000)
    return {"p50": statistics.median(overheads), "p95": percentile(overheads, 0.95), "n": len(overheads)}


async def measure_core_overhead(num_turns: int, store_target: str) -> dict:
    """The same turns driven in process (no client transport): the orchestrator's own time."""
    from services.orchestrator.adapters.grpc_store import GrpcStore
    from services.orchestrator.core.orchestrator import Orchestrator, OrchestratorConfig

    tools = TimedTools()
    answer = " ".join(f"w{i}" for i in range(20))
    reply = call("fs_read", path="a.txt") + "\n" + call("fs_list", path=".")
    inference = TimedInference(ScriptedInference([reply, answer] * (num_turns + 2), n_ctx=32768))
    async with contextlib.AsyncExitStack() as stack:
        if store_target:
            channel = await stack.enter_async_context(_channel(store_target, service_identity("orchestrator")))
            store = GrpcStore.for_channel(channel)
        else:
            store = MemoryStore()
        orch = Orchestrator(store=store, inference=inference, tools=tools, policy=FakePolicy(tools),
                            config=OrchestratorConfig(max_workers=0, event_batch_interval_s=0.005))
        session = await orch.sessions.create(request_id="", tenant_id=TENANT, title="", model="", system_prompt="",
                                             tools=())
        overheads = []
        for turn in range(num_turns + 2):
            inference.busy_s = tools.busy_s = 0.0
            started = time.perf_counter()
            _run, events = await orch.run(request_id=f"c{turn}", tenant_id=TENANT, session_id=session.session_id,
                                          user_message=f"turn {turn}")
            async for _ in events:
                pass
            total = time.perf_counter() - started
            if turn >= 2:
                overheads.append((total - inference.busy_s - tools.busy_s) * 1000)
        await orch.close()
    return {"p50": statistics.median(overheads), "p95": percentile(overheads, 0.95), "n": len(overheads)}


@contextlib.asynccontextmanager
async def real_inference(data_dir: Path):
    """The inference service when implemented, else llama.cpp in process; yields (port, description)."""
    from services.inference.config import Settings as InferenceSettings
    from services.inference.server import build_app as build_inference

    settings = InferenceSettings(port=0, data_dir=str(data_dir), n_ctx=4096, n_seq_max=4, n_threads=2,
                                 n_gpu_layers=0)
    async with running_service(build_inference(settings), settings) as svc:
        target = f"127.0.0.1:{svc.port}"
        if await _implemented(target, lambda ch: inference_pb2_grpc.InferenceServiceStub(ch).CountTokens(
                inference_pb2.CountTokensRequest(text="probe"))):
            async with _channel(target, service_identity("orchestrator")) as channel:
                yield GrpcInference.for_channel(channel), "inference service (llama.cpp, bundled Gemma 3 270M)"
                return
    from services.gemma.model_cache import ensure_model
    from services.orchestrator.adapters.local_llama import LocalLlamaInference

    local = LocalLlamaInference(ensure_model(), n_ctx=4096)
    try:
        yield local, "llama.cpp in process (inference service not implemented), bundled Gemma 3 270M"
    finally:
        local.close()


async def measure_ttfb(num_samples: int, store_target: str, data_dir: Path) -> dict:
    tools = FakeTools()
    async with real_inference(data_dir) as (engine, description):
        inference = TimedInference(engine)
        settings = Settings(port=0, store_target=store_target, max_workers=0, event_batch_ms=5)
        ports = dict(inference=inference, tools=tools, policy=FakePolicy(tools))
        if not store_target:
            ports["store"] = MemoryStore()
        ratios, client_ms = [], []
        async with running_service(build_app(settings, **ports), settings) as svc:
            async with _channel(svc.address, client_identity(TENANT)) as channel:
                stub = orchestrator_pb2_grpc.AgentServiceStub(channel)
                for i in range(num_samples + 1):
                    session = (await stub.CreateSession(pb.CreateSessionRequest(
                        tenant_id=TENANT, tools=["fs_read"], system_prompt=f"You are assistant {i}."))).session
                    started = time.perf_counter()
                    first_token = None
                    async for reply in stub.Run(pb.RunRequest(
                            request_id=f"ttfb{i}", tenant_id=TENANT, session_id=session.session_id,
                            user_message="Say hello in one short sentence.",
                            options=pb.RunOptions(max_steps=1, max_tokens=8, tool_choice="none"))):
                        if first_token is None and reply.event.HasField("token"):
                            first_token = time.perf_counter() - started
                    if i == 0 or first_token is None:
                        continue  # warm-up
                    engine_ttft = inference.ttft_ms[-1]
                    client_ms.append(first_token * 1000)
                    ratios.append(first_token * 1000 / engine_ttft)
    return {"ratio_p50": statistics.median(ratios), "client_ttfb_ms_p50": statistics.median(client_ms),
            "engine_ttft_ms_p50": statistics.median(inference.ttft_ms[1:]), "n": len(ratios),
            "engine": description}


async def _timed_turn(stub, session_id: str, message: str) -> tuple[float, pb.AgentEvent]:
    started = time.perf_counter()
    last = None
    async for reply in stub.Run(pb.RunRequest(request_id=f"{session_id}:{message}", tenant_id=TENANT,
                                              session_id=session_id, user_message=message,
                                              options=pb.RunOptions(max_steps=1, max_tokens=8, tool_choice="none"))):
        last = reply.event
    return (time.perf_counter() - started) * 1000, last


async def measure_failover(num_rounds: int, data_dir: Path) -> dict:
    from tests.orchestrator.balanced_mesh import balanced_orchestrator

    sticky_ms, failover_ms, failed = [], [], 0
    for round_index in range(num_rounds):
        async with balanced_orchestrator(data_dir / str(round_index), synthetic_ttft_ms=20) as mesh:
            session_id = (await mesh.stub.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT))).session.session_id
            for turn in range(4):
                elapsed, _last = await _timed_turn(mesh.stub, session_id, f"turn {turn}")
                if turn:  # the first turn also connects and warms the node
                    sticky_ms.append(elapsed)
            await mesh.kill_node_of(session_id)
            elapsed, last = await _timed_turn(mesh.stub, session_id, "after the node died")
            failover_ms.append(elapsed)
            failed += 0 if last is not None and last.HasField("final") else 1
    return {"sticky_turn_ms_p50": round(statistics.median(sticky_ms), 2),
            "failover_turn_ms_p50": round(statistics.median(failover_ms), 2),
            "failover_turn_ms_max": round(max(failover_ms), 2),
            "failover_turns_failed": failed, "rounds": num_rounds,
            "setup": {"nodes": "2 inference services, synthetic backend (200 tokens/s, 20 ms prefill), in process",
                      "turn": "1 model step, 8 tokens, no tools; in-memory store, fake tools and policy",
                      "failover": "the session's node is stopped (grace 0) between turns"}}


async def main(out: Path, num_turns: int, num_samples: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        async with store_service(Path(tmp) / "store") as store_target:
            core = await measure_core_overhead(num_turns, store_target)
            core_memory = await measure_core_overhead(num_turns, "")
            grpc_e2e = await measure_overhead(num_turns, store_target)
            ttfb = await measure_ttfb(num_samples, store_target, Path(tmp) / "inference")
    result = {
        "overhead_ms_p50": round(core["p50"], 3),
        "overhead_ms_p95": round(core["p95"], 3),
        "overhead_goal_p50_ms": 5.0,
        "overhead_turns": core["n"],
        "overhead_in_memory_store_ms_p50": round(core_memory["p50"], 3),
        "overhead_in_memory_store_ms_p95": round(core_memory["p95"], 3),
        "overhead_with_grpc_client_ms_p50": round(grpc_e2e["p50"], 3),
        "overhead_with_grpc_client_ms_p95": round(grpc_e2e["p95"], 3),
        "ttfb_overhead_ratio": round(ttfb["ratio_p50"], 3),
        "ttfb_goal_ratio": 1.2,
        "client_ttfb_ms_p50": round(ttfb["client_ttfb_ms_p50"], 2),
        "engine_ttft_ms_p50": round(ttfb["engine_ttft_ms_p50"], 2),
        "ttfb_samples": ttfb["n"],
        "setup": {
            "turn": "model step with 2 parallel tool calls, then a 20-word answer (26 events)",
            "overhead_ms": "in process: Orchestrator.run to its final event, inference and tool time subtracted",
            "overhead_with_grpc_client_ms": "same turn through the AgentService Run stream, client in the same "
                                            "process and event loop",
            "store": "store service, SQLite" if store_target else "in-memory (store service not implemented)",
            "inference_for_overhead": "scripted (fake), time inside it subtracted",
            "tools": "fake, 5 ms each, time inside them subtracted",
            "policy": "fake (no approval on these tools)",
            "inference_for_ttfb": ttfb["engine"],
        },
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(out.write_text, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/orchestrator.json"))
    parser.add_argument("--turns", type=int, default=60)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--failover-only", action="store_true", help="only the balancer failover measurement")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    if args.failover_only:
        with tempfile.TemporaryDirectory() as tmp:
            failover = asyncio.run(measure_failover(args.rounds, Path(tmp)))
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(failover, indent=2) + "\n")
        print(json.dumps(failover, indent=2))
        sys.exit(0)
    print(json.dumps(asyncio.run(main(args.out, args.turns, args.samples)), indent=2))
