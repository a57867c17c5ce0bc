"""`make bench-auth`: what authentication and TLS cost a caller.

| key | goal | measured by |
| --- | --- | --- |
| `auth_overhead_ms_p50` | <= 0.3 | p50 of unary GetLoad calls with a cached key minus p50 without auth |
| `tls_throughput_ratio` | >= 0.95 | tokens/s of 8 Generate streams with mutual TLS vs plaintext |

Three inference nodes with the bundled model run as processes of their own:
auth on (plaintext), auth off (plaintext) and auth on with mutual TLS. They are
measured one at a time, alternating, so machine noise falls on both sides.

    python bench/auth.py --out bench/results/auth.json
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmesh.inference.v1 import inference_pb2, inference_pb2_grpc

from bench.goals import Goals, write_result
from services.common.clients import make_channel
from services.common.identity import Identity, init_tls, service_key, tls_files
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "llmesh.inference.v1.InferenceService"
GOALS: Goals = {"auth_overhead_ms_p50": ("<=", 0.3), "tls_throughput_ratio": (">=", 0.95)}


class Node:
    def __init__(self, name: str, credentials: Path, *, auth: bool, tls: bool, log_dir: Path) -> None:
        self.name, self.credentials, self.auth, self.tls = name, credentials, auth, tls
        self.port = free_port()
        args = [sys.executable, "-m", "services.inference", "--port", str(self.port), "--metrics-port", "-1",
                "--credentials-dir", str(credentials), "--data-dir", str(log_dir / name),
                "--auth-enabled", str(auth).lower(), "--tls-enabled", str(tls).lower(),
                "--n-ctx", "4096", "--n-seq-max", "8", "--n-gpu-layers", "0", "--trace-file", ""]
        self.log = (log_dir / f"{name}.log").open("wb")
        self.process = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "LLMESH_LOG_LEVEL": "WARNING"})

    def identity(self) -> Identity:
        key = service_key(self.credentials, "orchestrator") if self.auth else None
        return Identity("orchestrator", key, tls_files(self.credentials, "orchestrator") if self.tls else None)

    def channel(self) -> grpc.aio.Channel:
        return make_channel(f"127.0.0.1:{self.port}", self.identity(), traced=False)

    async def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        async with self.channel() as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited; see its log")
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.2)  # start-up only
        raise TimeoutError(f"{self.name} not ready")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


async def unary_latencies(node: Node, calls: int) -> list[float]:
    async with node.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=10)  # connect, verify the key once
        out = []
        for _ in range(calls):
            started = time.perf_counter()
            await stub.GetLoad(inference_pb2.GetLoadRequest(), timeout=10)
            out.append((time.perf_counter() - started) * 1000)
        return out


async def stream_tokens_per_s(node: Node, streams: int, max_tokens: int) -> float:
    async with node.channel() as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        nonce = os.urandom(4).hex()  # no reply may come from the response cache or a merged decode

        async def one(i: int) -> int:
            request = inference_pb2.GenerateRequest(
                prompt=f"Write a short story about a lighthouse keeper, number {i} ({nonce}).",
                sampling=inference_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, seed=i))
            tokens = 0
            async for reply in stub.Generate(request, timeout=300):
                tokens += reply.usage.generated_tokens if reply.HasField("usage") else 0
            return tokens

        started = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(streams)))
        return sum(counts) / (time.perf_counter() - started)


async def measure(calls: int, rounds: int, streams: int, max_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llmesh-bench-auth-") as tmp:
        root = Path(tmp)
        credentials = root / "credentials"
        service_key(credentials, "orchestrator")
        init_tls(credentials)
        nodes = {name: Node(name, credentials, auth=auth, tls=tls, log_dir=root)
                 for name, auth, tls in (("auth", True, False), ("open", False, False), ("auth_tls", True, True))}
        try:
            await asyncio.gather(*(n.wait_ready() for n in nodes.values()))
            with_auth: list[float] = []
            without: list[float] = []
            block = max(1, calls // 10)
            for _ in range(calls // block):  # alternating blocks: noise falls on both sides
                with_auth += await unary_latencies(nodes["auth"], block)
                without += await unary_latencies(nodes["open"], block)
            plain_rates: list[float] = []
            tls_rates: list[float] = []
            await stream_tokens_per_s(nodes["auth"], streams, 4)  # warm both engines
            await stream_tokens_per_s(nodes["auth_tls"], streams, 4)
            for i in range(rounds):  # ABBA order: a drift in machine speed falls on both sides
                order = [("auth", plain_rates), ("auth_tls", tls_rates)]
                for name, rates in order if i % 2 == 0 else reversed(order):
                    rates.append(await stream_tokens_per_s(nodes[name], streams, max_tokens))
        finally:
            for node in nodes.values():
                node.stop()
    p50_auth, p50_open = statistics.median(with_auth), statistics.median(without)
    return {
        "auth_overhead_ms_p50": round(p50_auth - p50_open, 4),
        "tls_throughput_ratio": round(statistics.median(tls_rates) / statistics.median(plain_rates), 4),
        "unary": {"calls_each": len(with_auth), "p50_ms_with_auth": round(p50_auth, 4),
                  "p50_ms_without_auth": round(p50_open, 4),
                  "p99_ms_with_auth": round(statistics.quantiles(with_auth, n=100)[98], 4),
                  "p99_ms_without_auth": round(statistics.quantiles(without, n=100)[98], 4)},
        "generate": {"streams": streams, "max_tokens": max_tokens, "rounds": rounds,
                     "tokens_per_s_plaintext": [round(r, 2) for r in plain_rates],
                     "tokens_per_s_mtls": [round(r, 2) for r in tls_rates]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    started = time.monotonic()
    result = asyncio.run(measure(args.calls, args.rounds, args.streams, args.max_tokens))
    write_result(args.out, result, GOALS, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
