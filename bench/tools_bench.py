"""Tool executor benchmark: batch parallelism and the result cache.

parallel_speedup: 8 independent 200 ms shell tools (`sleep 0.2` in the
sandbox) in one ExecuteTools batch vs the same 8 as ExecuteTool calls one
after another. cache_hit_speedup: repeated fs_read of a 1 MB file, cache
off vs warm cache, measured through gRPC and inside the executor.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.clients import make_channel
from services.common.runtime import running_service
from services.tools.config import Settings
from services.tools.core.model import CallContext, ToolInvocation
from services.tools.server import App
from tests.support.auth import service_identity

NUM_PARALLEL = 8
SLEEP_CALL = tools_pb2.ToolCall(name="shell_exec", arguments_json=json.dumps({"command": "sleep 0.2"}))
READ_ARGS = {"path": "big.bin"}


def request(call: tools_pb2.ToolCall) -> tools_pb2.ExecuteToolRequest:
    return tools_pb2.ExecuteToolRequest(tenant_id="bench", session_id="s1", call=call)


async def time_it(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    """Median seconds of ``repeats`` runs of ``await fn()``."""
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        await fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


async def bench_parallel(stub: tools_pb2_grpc.ToolServiceStub, repeats: int) -> dict[str, float]:
    async def serial() -> None:
        for _ in range(NUM_PARALLEL):
            reply = await stub.ExecuteTool(request(SLEEP_CALL))
            assert reply.result.status == tools_pb2.TOOL_STATUS_OK, reply.result

    async def batch() -> None:
        calls = [tools_pb2.ToolCall(call_id=str(i), name=SLEEP_CALL.name, arguments_json=SLEEP_CALL.arguments_json)
                 for i in range(NUM_PARALLEL)]
        reply = await stub.ExecuteTools(tools_pb2.ExecuteToolsRequest(tenant_id="bench", session_id="s1", calls=calls))
        assert all(r.status == tools_pb2.TOOL_STATUS_OK for r in reply.results)

    await batch()  # warm-up
    serial_s = await time_it(serial, repeats)
    batch_s = await time_it(batch, repeats)
    return {"serial_ms": serial_s * 1000, "batch_ms": batch_s * 1000, "parallel_speedup": serial_s / batch_s}


async def bench_cache(app: App, stub: tools_pb2_grpc.ToolServiceStub, repeats: int) -> dict[str, float]:
    read = tools_pb2.ToolCall(name="fs_read", arguments_json=json.dumps(READ_ARGS))
    ctx = CallContext("", "bench", "s1", "")
    invocation = ToolInvocation("c", "fs_read", READ_ARGS, json.dumps(READ_ARGS))
    cache = app.executor.cache

    async def grpc_read() -> None:
        reply = await stub.ExecuteTool(request(read))
        assert reply.result.status == tools_pb2.TOOL_STATUS_OK and reply.result.content.original_bytes == 1 << 20

    async def core_read() -> None:
        await app.executor.execute(ctx, invocation)

    results: dict[str, float] = {}
    for label, fn in (("grpc", grpc_read), ("executor", core_read)):
        ttl = cache.ttl_s
        cache.ttl_s = 0  # every read misses
        miss_s = await time_it(fn, repeats)
        cache.ttl_s = ttl
        await fn()  # fill
        hit_s = await time_it(fn, repeats)
        results[f"{label}_miss_ms"] = miss_s * 1000
        results[f"{label}_hit_ms"] = hit_s * 1000
        results[f"{label}_speedup"] = miss_s / hit_s
    return results


async def main(out: Path, repeats: int) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="llmesh-tools-bench-"))
    await asyncio.to_thread(base.chmod, 0o755)
    try:
        settings = Settings(port=0, workspace_root=str(base / "ws"), data_dir=str(base),
                            max_concurrent_calls=NUM_PARALLEL, max_concurrent_calls_per_session=NUM_PARALLEL)
        app = App(settings)
        async with running_service(app, settings) as svc:
            # Tools run for the orchestrator only: the bench presents its key (untraced, a plain client).
            async with make_channel(svc.address, service_identity("orchestrator"), traced=False,
                                    options=[]) as channel:
                stub = tools_pb2_grpc.ToolServiceStub(channel)
                workspace = app.executor.roots.for_session("bench", "s1").root
                (workspace / "big.bin").write_bytes(os.urandom(1 << 20))
                parallel = await bench_parallel(stub, max(3, repeats // 10))
                cache = await bench_cache(app, stub, repeats)
                sandbox_mode = app.sandbox.mode if app.sandbox else "unknown"
    finally:
        shutil.rmtree(base, ignore_errors=True)
    result = {
        "parallel_speedup": round(parallel["parallel_speedup"], 2),
        "cache_hit_speedup": round(cache["executor_speedup"], 2),
        "cache_hit_speedup_grpc": round(cache["grpc_speedup"], 2),
        "details": {k: round(v, 3) for k, v in {**parallel, **cache}.items()},
        "num_parallel_calls": NUM_PARALLEL,
        "file_bytes": 1 << 20,
        "sandbox": sandbox_mode,
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    await asyncio.to_thread(out.write_text, json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench/results/tools.json"))
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.out, args.repeats)), indent=2))
