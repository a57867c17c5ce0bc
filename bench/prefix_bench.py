"""Shared prefixes: a new session's TTFT when its prefix is held, KV cells of sessions sharing one, routing.

    python bench/prefix_bench.py --out bench/results/prefix.json

- ``new_session_ttft_ratio``: TTFT of a new session whose ~1,500-token prefix
  another session of its tenant holds, over the same prompt sent cold (by
  another tenant, which shares nothing); the bundled model on CPU, greedy, and
  the two must decode the same tokens.
- ``kv_cells_ratio``: KV cells in use once 16 sessions sharing that prefix,
  each with a ~100-token suffix, are resident, over the same 16 sessions on an
  engine that shares nothing (``prefix_block_tokens=0``). Both counts are the
  engine's cell table, checked against the model's own sequence positions.
- ``prefix_routing_ttft_p90_ratio_vs_p2c`` and ``prefix_hit_rate``: see
  ``bench/prefix_routing.py`` (3 synthetic nodes, 8 prefixes, 200 new sessions).
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path

import llama_cpp as ll

from bench.goals import Goals, write_result
from bench.prefix_routing import run_prefix_routing
from services.gemma.model_cache import ensure_model
from services.inference.adapters.llama_backend import LlamaBackend
from services.inference.core.engine import Engine, EngineConfig
from services.inference.core.types import GenerateSpec, SamplingParams, Usage

GOALS: Goals = {
    "new_session_ttft_ratio": ("<=", 0.1),
    "kv_cells_ratio": ("<=", 0.15),
    "prefix_routing_ttft_p90_ratio_vs_p2c": ("<=", 0.3),
    "prefix_hit_rate": (">=", 0.9),
}

TOOLS = [
    ("read_file", "Read a UTF-8 text file of the workspace and return its lines, numbered."),
    ("write_file", "Write text to a file of the workspace, replacing it; parent folders must exist."),
    ("list_dir", "List the entries of a folder of the workspace, with their kinds and sizes."),
    ("search", "Search the files of the workspace for a regular expression and return the matches."),
    ("run_command", "Run a command in the sandbox and return its exit status, output and errors."),
    ("http_get", "Fetch a URL from the allow-list and return its status, headers and body."),
]


def system_prompt(target_tokens: int, backend: LlamaBackend) -> str:
    """An agent's system prompt and tool descriptions, grown to about ``target_tokens`` tokens."""
    text = "You are a careful coding agent. Think before acting, call tools when needed, and answer briefly.\n"
    round_ = 0
    while len(backend.tokenize(text, True, True)) < target_tokens:
        name, description = TOOLS[round_ % len(TOOLS)]
        text += (f"Tool {name}_{round_}: {description} Arguments are JSON; errors come back as text "
                 f"with a reason. Use it at most {round_ % 5 + 2} times per turn.\n")
        round_ += 1
    return text


async def run(engine: Engine, spec: GenerateSpec) -> tuple[list[int], Usage]:
    tokens: list[int] = []
    usage: Usage | None = None
    async for delta in engine.submit(spec):
        tokens.extend(delta.token_ids)
        usage = delta.usage or usage
    assert usage is not None
    return tokens, usage


def spec(prompt: str, session: str, tenant: str, max_tokens: int = 8) -> GenerateSpec:
    return GenerateSpec(prompt=prompt, session_id=f"{tenant}\x1f{session}", tenant_id=tenant,
                        sampling=SamplingParams(max_tokens=max_tokens))


def make_engine(model: Path, n_ctx: int, n_seq: int, block_tokens: int = 32) -> Engine:
    backend = LlamaBackend(model, n_ctx=n_ctx, n_seq_max=n_seq, n_batch=512)
    engine = Engine(backend, EngineConfig(max_queue=64, prefix_block_tokens=block_tokens))
    engine.start()
    return engine


def close(engine: Engine) -> None:
    engine.stop()
    engine.backend.close()


async def new_session_ttft(model: Path, prefix_tokens: int, rounds: int) -> dict:
    engine = make_engine(model, n_ctx=8192, n_seq=4)
    try:
        prefix = system_prompt(prefix_tokens, engine.backend)
        await run(engine, spec(prefix + "User: list the files in src.\nAgent:", "holder", "bench"))
        warm_ms, cold_ms, same, cached, prompt = [], [], 0, [], 0
        for i in range(rounds):
            prompt_text = prefix + f"User: what does module number {i} do?\nAgent:"
            warm_tokens, warm = await run(engine, spec(prompt_text, f"new-{i}", "bench"))
            cold_tokens, cold = await run(engine, spec(prompt_text, f"new-{i}", f"cold-{i}"))
            assert cold.cached_tokens == 0, "the cold run found cells of its own"
            warm_ms.append(warm.ttft_ms)
            cold_ms.append(cold.ttft_ms)
            cached.append(warm.cached_tokens)
            prompt = warm.prompt_tokens
            same += warm_tokens == cold_tokens
            for session in (f"bench\x1fnew-{i}", f"cold-{i}\x1fnew-{i}"):
                await engine.release_session(session)
        ratio = statistics.median(warm_ms) / statistics.median(cold_ms)
        return {"new_session_ttft_ratio": round(ratio, 4), "warm_ttft_ms": [round(x, 1) for x in warm_ms],
                "cold_ttft_ms": [round(x, 1) for x in cold_ms],
                "new_session_ttft_ms_p50": round(statistics.median(warm_ms), 1),
                "cold_ttft_ms_p50": round(statistics.median(cold_ms), 1),
                "prompt_tokens": prompt, "cached_tokens_p50": statistics.median(cached),
                "same_tokens_as_cold": f"{same}/{rounds}"}
    finally:
        close(engine)


def model_cells(engine: Engine) -> int:
    """Cells per the model: each sequence's positions run from 0, so a sequence holds pos_max + 1 cells."""
    memory = ll.llama_get_memory(engine.backend._ctx)
    return sum(ll.llama_memory_seq_pos_max(memory, seq) + 1 for seq in range(engine.backend.n_seq_max))


async def resident_cells(model: Path, prefix_tokens: int, sessions: int, suffix_tokens: int,
                         block_tokens: int) -> dict:
    n_ctx = sessions * (prefix_tokens + suffix_tokens + 64) + 512
    engine = make_engine(model, n_ctx=n_ctx, n_seq=sessions, block_tokens=block_tokens)
    try:
        prefix = system_prompt(prefix_tokens, engine.backend)
        suffix_words = " ".join(f"item{j}" for j in range(suffix_tokens // 2))

        def prompt(i: int) -> str:
            return prefix + f"User {i}: sort these: {suffix_words}\nAgent:"

        started = time.perf_counter()
        await run(engine, spec(prompt(0), "s0", "bench", max_tokens=4))
        await asyncio.gather(*(run(engine, spec(prompt(i), f"s{i}", "bench", max_tokens=4))
                               for i in range(1, sessions)))
        seconds = time.perf_counter() - started
        table = engine.scheduler.table
        held = model_cells(engine)
        assert held == table.held_cells, (held, table.held_cells)
        assert table.num_sessions == sessions
        return {"used_cells": table.used_cells, "held_cells": held, "seconds": round(seconds, 1)}
    finally:
        close(engine)


async def main(args: argparse.Namespace) -> dict:
    model = ensure_model()
    result: dict = {"model": model.name}
    result["new_session"] = await new_session_ttft(model, args.prefix_tokens, args.rounds)
    result["new_session_ttft_ratio"] = result["new_session"]["new_session_ttft_ratio"]
    shared = await resident_cells(model, args.prefix_tokens, args.sessions, args.suffix_tokens, 32)
    private = await resident_cells(model, args.prefix_tokens, args.sessions, args.suffix_tokens, 0)
    result["kv_cells"] = {"sessions": args.sessions, "shared": shared, "private": private}
    result["kv_cells_ratio"] = round(shared["used_cells"] / private["used_cells"], 4)
    routing = await run_prefix_routing()
    result["routing"] = routing
    result["prefix_routing_ttft_p90_ratio_vs_p2c"] = routing["prefix_routing_ttft_p90_ratio_vs_p2c"]
    result["prefix_hit_rate"] = routing["prefix_hit_rate"]
    result["vs_llama_server"] = ("not measured: no llama-server binary is installed by the set-up "
                                 "(llama-cpp-python builds the library only)")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench/results/prefix.json"))
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--suffix-tokens", type=int, default=100)
    arguments = parser.parse_args()
    began = time.monotonic()
    write_result(arguments.out, asyncio.run(main(arguments)), GOALS, began)
