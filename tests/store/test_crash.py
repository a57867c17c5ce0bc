"""Killing the store process mid write burst loses no acknowledged event."""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from llmesh.store.v1 import store_pb2 as pb
from llmesh.store.v1 import store_pb2_grpc

from tests.support.auth import CREDENTIALS, service_channel

ROOT = Path(__file__).resolve().parents[2]


def start_store(db_url: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen, int]:
    out = log.open("w")
    proc = subprocess.Popen([sys.executable, "-m", "services.store", "--port", "0", "--data-dir", str(data_dir),
                             "--database-url", db_url, "--credentials-dir", str(CREDENTIALS.resolve())],
                            cwd=ROOT, stdout=out, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if '"serving"' in line:
                return proc, json.loads(line)["port"]
        if proc.poll() is not None:
            raise RuntimeError(f"store exited: {log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError("store did not start")


@pytest.mark.slow
async def test_kill_mid_burst_keeps_every_acknowledged_event(db_url: str, tmp_path: Path) -> None:
    proc, port = start_store(db_url, tmp_path, tmp_path / "store1.log")
    acked: dict[int, bytes] = {}
    try:
        async with service_channel(f"127.0.0.1:{port}", "orchestrator") as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(tenant_id="acme", session_id="burst"))

            async def writer(worker: int) -> None:
                for i in range(100_000):
                    payload = f"{worker}-{i}".encode()
                    try:
                        reply = await stub.AppendEvents(pb.AppendEventsRequest(
                            tenant_id="acme", session_id="burst", events=[pb.Event(type="final", payload=payload)]),
                            timeout=5)
                    except grpc.aio.AioRpcError:
                        return  # the store died under us; this append was never acknowledged
                    acked[reply.seqs[0]] = payload

            writers = [asyncio.create_task(writer(w)) for w in range(16)]
            await asyncio.sleep(1.0)
            assert len(acked) > 20, "the burst never got going"
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*writers), 30)
    finally:
        proc.kill()
        proc.wait()

    proc, port = start_store(db_url, tmp_path, tmp_path / "store2.log")
    try:
        async with service_channel(f"127.0.0.1:{port}", "orchestrator") as channel:
            stub = store_pb2_grpc.StoreServiceStub(channel)
            stored: dict[int, bytes] = {}
            token = ""
            while True:
                page = await stub.ReadEvents(pb.ReadEventsRequest(tenant_id="acme", session_id="burst",
                                                                  page_size=1000, page_token=token))
                stored.update({e.seq: e.payload for e in page.events})
                token = page.next_page_token
                if not token:
                    break
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    missing = {seq for seq, payload in acked.items() if stored.get(seq) != payload}
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert sorted(stored) == list(range(1, len(stored) + 1)), "seqs must stay gapless after a crash"
