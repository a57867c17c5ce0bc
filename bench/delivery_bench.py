"""Delivery beyond the open stream: webhook outbox throughput and loss, a dead destination, WebSocket resumes.

Writes bench/results/delivery.json:

- ``deliveries_per_s`` on SQLite and on PostgreSQL: 2,000 run events over 50
  sessions of 5 tenants, each tenant with a webhook to its own loopback
  receiver that fails 30% of requests, answers some 429 with Retry-After and
  hangs on some past the sender's timeout; the store is SIGKILLed and
  restarted mid-delivery. Delivered means a receiver answered 2xx;
  ``events_lost`` counts events no receiver ever accepted (goal 0), and
  ``order_violations`` deliveries a receiver accepted before an earlier
  event of their session (goal 0).
- ``healthy_destination_p95_ms_with_one_dead``: the same events at a steady
  40 per second with one receiver dead (connections refused) and the four
  others answering at once: p95 of event-stored to accepted for the healthy
  ones (goal <= 2000); the dead one's deliveries end as dead letters after 3
  attempts, and replaying them once it is back delivers them. (The chaos run
  dead-letters after 20, which a receiver failing 30% of requests
  practically never exhausts.)
- ``ws_resume_exact``: 100 runs of the real orchestrator (scripted model)
  watched over a WebSocket through the gateway, each socket dropped at a
  random point and resumed with ``after_seq``: the fraction that saw every
  event exactly once (goal 1.0).

    python bench/delivery_bench.py [--events 2000] [--sockets 100] [--db sqlite,postgres]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from pathlib import Path

from websockets.asyncio.client import connect

from tests.orchestrator.fakes import ScriptedInference
from tests.support.mesh import running_mesh
from tests.support.postgres import find_pg_bin, postgres_cluster
from tests.support.webhook_load import delivery_load

ROOT = Path(__file__).resolve().parents[1]

WS_WORDS = 40


async def ws_resume(sockets: int, data_dir: Path) -> dict:
    """Each run watched over a socket that is dropped at a random point and resumed after the last seq seen."""
    rng = random.Random(7)
    reply = " ".join(f"w{i}" for i in range(WS_WORDS))
    inference = ScriptedInference([reply] * sockets, token_delay_s=0.003)
    exact = 0
    problems: list[str] = []
    start = time.perf_counter()
    async with running_mesh(data_dir, inference=inference, gateway=True) as mesh:
        base = mesh.url.replace("http://", "ws://")
        headers = {"Authorization": f"Bearer {mesh.api_key}"}
        async with mesh.client() as http:
            for i in range(sockets):
                created = await http.post("/v1/sessions", json={"title": f"ws-{i}"})
                session_id = created.json()["session"]["sessionId"]
                seen: list[dict] = []
                ws = await connect(f"{base}/v1/sessions/{session_id}/ws", additional_headers=headers, proxy=None)
                await ws.send(json.dumps({"type": "run", "user_message": "count"}))
                drop_after = rng.randint(1, WS_WORDS)
                while len(seen) < drop_after:
                    message = json.loads(await ws.recv())
                    if "event" in message:
                        seen.append(message["event"])
                        if "final" in message["event"]:
                            break
                if rng.random() < 0.5:
                    ws.transport.abort()
                else:
                    await ws.close()
                after = int(seen[-1]["seq"]) if seen else 0
                ws = await connect(f"{base}/v1/sessions/{session_id}/ws?after_seq={after}",
                                   additional_headers=headers, proxy=None)
                while not (seen and "final" in seen[-1]):
                    message = json.loads(await asyncio.wait_for(ws.recv(), 30))
                    if "event" in message:
                        seen.append(message["event"])
                await ws.close()
                seqs = [int(event["seq"]) for event in seen]
                if seqs == list(range(1, len(seqs) + 1)) and len(seqs) == WS_WORDS + 2:
                    exact += 1
                elif len(problems) < 5:
                    problems.append(f"socket {i}: seqs {seqs[:5]}...{seqs[-5:]} ({len(seqs)})")
    return {"ws_resume_exact": round(exact / sockets, 4) if sockets else 0.0, "sockets": sockets,
            "events_per_run": WS_WORDS + 2, "wall_s": round(time.perf_counter() - start, 1), "problems": problems,
            "goal": 1.0, "note": "real orchestrator and store, scripted model; one drop per socket, abrupt or "
                                 "clean at random, resumed with ?after_seq"}


async def deliveries(db: str, events: int, data_dir: Path) -> dict:
    """Both scenarios on one database kind: chaos and a store kill, then one dead destination."""
    if db == "sqlite":
        urls = (f"sqlite+aiosqlite:///{data_dir / 'chaos.db'}", f"sqlite+aiosqlite:///{data_dir / 'dead.db'}")
        return await _scenarios(*urls, data_dir, events)
    if find_pg_bin() is None:
        return {"skipped": "PostgreSQL server binaries not found"}
    with postgres_cluster() as cluster:
        return await _scenarios(cluster.new_database("chaos"), cluster.new_database("dead"), data_dir, events)


async def _scenarios(chaos_url: str, dead_url: str, data_dir: Path, events: int = 2000) -> dict:
    chaos = await delivery_load(chaos_url, data_dir / "chaos", events=events, fail_rate=0.3, kill_store=True,
                                rate_per_s=200, deadline_s=600)
    one_dead = await delivery_load(dead_url, data_dir / "dead", events=events, fail_rate=0.0, dead=1,
                                   max_attempts=3, rate_per_s=40, deadline_s=600)
    return {"chaos_and_store_kill": chaos, "one_dead_destination": one_dead}


async def main(args: argparse.Namespace) -> dict:
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-delivery-") as tmp:
        for db in [d for d in args.db.split(",") if d]:
            results[db] = await deliveries(db, args.events, Path(tmp) / db)
        runs = [run for db in results.values() for run in db.values() if isinstance(run, dict)]
        if runs:
            results["deliveries_per_s"] = {db: r["chaos_and_store_kill"]["deliveries_per_s"]
                                           for db, r in results.items() if "chaos_and_store_kill" in r}
            results["events_lost"] = sum(run["events_lost"] for run in runs)
            results["order_violations"] = sum(run["order_violations"] for run in runs)
            results["healthy_destination_p95_ms_with_one_dead"] = max(
                r["one_dead_destination"]["delay_p95_ms"] for r in results.values()
                if isinstance(r, dict) and "one_dead_destination" in r)
        if args.sockets:
            results["websocket"] = await ws_resume(args.sockets, Path(tmp) / "ws")
            results["ws_resume_exact"] = results["websocket"]["ws_resume_exact"]
    results["goals"] = {"events_lost": 0, "order_violations": 0, "healthy_destination_p95_ms_with_one_dead": 2000,
                        "ws_resume_exact": 1.0}
    results["goals_met"] = (results.get("events_lost") == 0 and results.get("order_violations") == 0
                            and (results.get("healthy_destination_p95_ms_with_one_dead") or 1e9) <= 2000
                            and results.get("ws_resume_exact", 1.0) == 1.0)
    results["config"] = {"events": args.events, "sockets": args.sockets, "python": platform.python_version(),
                         "machine": platform.machine(),
                         "note": "50 sessions of 5 tenants, a webhook and loopback receiver each; store in its own "
                                 "process (FULL sync on SQLite); one delivery worker with 8 senders, 4 per "
                                 "destination"}
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--sockets", type=int, default=100)
    parser.add_argument("--db", default="sqlite,postgres")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "delivery.json"))
    args = parser.parse_args()
    output = asyncio.run(main(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(output, indent=2) + "\n")
    print(json.dumps(output, indent=2))
