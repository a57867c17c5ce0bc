"""`make run REPLICAS=2 DB=postgres`: replicas of every stateless service on one PostgreSQL, reached round robin.

The plan (ports, wiring) is checked without processes; then one mesh is
started as ``make run REPLICAS=2 DB=postgres`` starts it, with mutual TLS and
API keys, and a second pair of launchers fail on purpose halfway through
their start to show that nothing is left behind.
"""
from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.launcher import (
    POSTGRES_DATABASE,
    REPLICA_PORT_STRIDE,
    STOP_TIMEOUT_S,
    Child,
    plan_children,
    postgres_port,
)
from tests.support.auth import open_channel
from tests.support.mesh import CHEAP_INFERENCE_ENV, LaunchedMesh, launched_mesh, launcher_port_base, replicated_mesh
from tests.support.postgres import find_pg_bin, skip_or_fail
from tests.support.waiting import wait_until

BASE = 30000


def _by_name(children: list[Child]) -> dict[str, Child]:
    return {c.name: c for c in children}


# --- the plan -------------------------------------------------------------------------------------------------


def test_the_default_plan_is_one_process_per_service_on_sqlite() -> None:
    children = _by_name(plan_children(Path("/d"), BASE, 1, 8080))
    assert {name: c.port for name, c in children.items()} == {
        "store": BASE + 4, "policy": BASE + 3, "tools": BASE + 2, "inference": BASE,
        "orchestrator": BASE + 1, "gateway": 8080}
    env = children["orchestrator"].extra_env
    assert env["LLMESH_STORE_TARGET"] == f"127.0.0.1:{BASE + 4}"
    assert env["LLMESH_ORCHESTRATOR_TARGET"] == f"127.0.0.1:{BASE + 1}"
    assert not any("DATABASE_URL" in key or "REPLICA_ID" in key or "TRACE_FILE" in key
                   for c in children.values() for key in c.extra_env)


def test_replicas_get_their_own_ports_and_every_caller_lists_them_all() -> None:
    children = _by_name(plan_children(Path("/d"), BASE, 1, 8080, replicas=2, db="postgres"))
    assert sorted(children) == ["gateway", "inference", "orchestrator-1", "orchestrator-2", "policy-1", "policy-2",
                                "store-1", "store-2", "tools-1", "tools-2"]
    assert children["orchestrator-2"].port == BASE + 1 + REPLICA_PORT_STRIDE
    assert children["orchestrator-2"].metrics_port == BASE + 101 + REPLICA_PORT_STRIDE
    for child in children.values():
        env = child.extra_env
        assert env["LLMESH_ORCHESTRATOR_TARGET"] == f"127.0.0.1:{BASE + 1},127.0.0.1:{BASE + 21}"
        assert env["LLMESH_STORE_TARGET"] == f"127.0.0.1:{BASE + 4},127.0.0.1:{BASE + 24}"
        policy = f"127.0.0.1:{BASE + 3},127.0.0.1:{BASE + 23}"
        assert env["LLMESH_AUDIT_TARGET"] == env["LLMESH_POLICY_TARGET"] == policy
    url = f"postgresql+psycopg://postgres@127.0.0.1:{postgres_port(BASE)}/{POSTGRES_DATABASE}"
    assert children["store-1"].extra_env["LLMESH_STORE_DATABASE_URL"] == url
    assert children["store-2"].extra_env["LLMESH_STORE_DATABASE_URL"] == url
    assert children["orchestrator-2"].extra_env["LLMESH_ORCHESTRATOR_REPLICA_ID"] == "orchestrator-2"
    assert children["tools-2"].extra_env["LLMESH_TOOLS_TRACE_FILE"] == "traces/tools-2.jsonl"


def test_on_sqlite_the_store_stays_one_replica() -> None:
    children = _by_name(plan_children(Path("/d"), BASE, 1, None, replicas=2))
    assert "store" in children and "store-2" not in children and "orchestrator-2" in children
    assert "LLMESH_STORE_DATABASE_URL" not in children["store"].extra_env


def test_a_layout_whose_ports_collide_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer --nodes or --replicas"):
        plan_children(Path("/d"), BASE, 12, None, replicas=2)
    with pytest.raises(ValueError, match="--db 'mysql'"):
        plan_children(Path("/d"), BASE, 1, None, db="mysql")


# --- a replicated mesh ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[LaunchedMesh]:
    with replicated_mesh(tmp_path_factory.mktemp("replicas"), tls=True) as running:
        yield running


def _rpc_counts(text: str, prefix: str) -> int:
    """RPCs served whose method starts with ``prefix``, from a Prometheus page."""
    return sum(int(sample.value) for family in text_string_to_metric_families(text)
               if family.name == "llmesh_rpc_duration_seconds" for sample in family.samples
               if sample.name.endswith("_count") and sample.labels.get("method", "").startswith(prefix))


async def _served(mesh: LaunchedMesh, service: str, prefix: str) -> list[int]:
    async with httpx.AsyncClient(timeout=10) as http:
        pages = [await http.get(mesh.metrics_url(service, replica))
                 for replica in range(1, len(mesh.replicas(service)) + 1)]
    return [_rpc_counts(page.text, prefix) for page in pages]


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
async def test_every_replica_serves_health(mesh: LaunchedMesh) -> None:
    grpc_children = [c for c in mesh.children if c.service.kind == "grpc"]
    assert sorted(c.name for c in grpc_children) == ["inference", "orchestrator-1", "orchestrator-2", "policy-1",
                                                     "policy-2", "store-1", "store-2", "tools-1", "tools-2"]
    for child in grpc_children:
        async with open_channel(child.target, mesh.credentials, tls=mesh.tls) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            for name in ("", child.service.full_name):
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING, (child.name, name)
    async with httpx.AsyncClient(base_url=mesh.url, timeout=10) as http:
        assert (await http.get("/healthz")).status_code == 200
    printed = "".join(mesh.lines)
    for child in mesh.children:
        assert re.search(rf"{re.escape(child.name)}\s+(http://)?{re.escape(child.target)}\s", printed), child.name
    assert mesh.target("orchestrator") in printed


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
async def test_a_session_made_through_the_gateway_runs_on_any_replica_and_lives_in_postgres(
        mesh: LaunchedMesh) -> None:
    import psycopg

    auth = {"Authorization": f"Bearer {mesh.dev_key}"}
    async with httpx.AsyncClient(base_url=mesh.url, headers=auth, timeout=60) as http:
        reply = await http.post("/v1/sessions", json={"title": "across replicas"})
        assert reply.status_code == 200, reply.text
        session_id = reply.json()["session"]["sessionId"]
        async with mesh.client_channel("orchestrator") as channel:
            agent = pb_grpc.AgentServiceStub(channel)
            for turn in range(2):  # two turns: round robin puts them on different replicas
                events = [r.event async for r in agent.Run(pb.RunRequest(
                    session_id=session_id, user_message=f"turn {turn}",
                    options=pb.RunOptions(max_steps=1, max_tokens=4, tool_choice="none", seed=1)), timeout=120)]
                assert events[-1].type == pb.EVENT_TYPE_FINAL, events[-1]

        async def stored_up_to_final() -> bool:
            seen = (await http.get(f"/v1/sessions/{session_id}")).json()["session"]
            return int(seen["lastSeq"]) >= events[-1].seq

        assert await wait_until(stored_up_to_final, timeout_s=10)
    dsn = f"host=127.0.0.1 port={postgres_port(mesh.base)} user=postgres dbname={POSTGRES_DATABASE}"
    rows = await asyncio.to_thread(_query, psycopg, dsn, session_id)
    assert rows == [("default", "across replicas")]


def _query(psycopg, dsn: str, session_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT tenant_id, title FROM store_sessions WHERE session_id = %s",
                            (session_id,)).fetchall()


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
async def test_calls_are_spread_over_both_orchestrator_and_store_replicas(mesh: LaunchedMesh) -> None:
    calls = 20
    create = "/llmesh.orchestrator.v1.AgentService/CreateSession"
    store_create = "/llmesh.store.v1.StoreService/CreateSession"
    before = await _served(mesh, "orchestrator", create)
    store_before = await _served(mesh, "store", store_create)
    async with mesh.client_channel("orchestrator") as channel:
        agent = pb_grpc.AgentServiceStub(channel)
        for i in range(calls):
            await agent.CreateSession(pb.CreateSessionRequest(title=f"spread {i}"), timeout=30)
    served: list[int] = []
    stored: list[int] = []

    async def counted() -> bool:
        # A server observes an RPC's duration as it ends, a moment after the client has its reply.
        served[:] = [a - b for a, b in zip(await _served(mesh, "orchestrator", create), before, strict=True)]
        stored[:] = [a - b for a, b in zip(await _served(mesh, "store", store_create), store_before, strict=True)]
        return sum(served) >= calls and sum(stored) >= calls

    assert await wait_until(counted, timeout_s=10, interval_s=0.2), (served, stored)
    # Round robin alternates once the channel has reached both; the first calls go to the one it reached first.
    assert sum(served) == calls and min(served) >= 3, served
    # Each orchestrator replica reaches the store replicas round robin too.
    assert min(stored) >= 1, stored


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
async def test_a_killed_replica_is_reported_the_other_serves_on_and_it_comes_back(mesh: LaunchedMesh) -> None:
    pid = mesh.kill("orchestrator", replica=2)
    assert await mesh.wait_for_output("the mesh goes on with orchestrator-1")
    # The launcher starts it again, as a supervisor would.
    assert await mesh.wait_for_output("orchestrator-2 restarted and ready", timeout_s=120)
    assert mesh.pid("orchestrator", replica=2) != pid
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    async with mesh.client_channel("orchestrator") as channel:
        agent = pb_grpc.AgentServiceStub(channel)
        for i in range(4):
            await agent.CreateSession(pb.CreateSessionRequest(title=f"after the kill {i}"), timeout=30)
    assert mesh.process.poll() is None


# Runs last: it stops the mesh the other tests share.
@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
def test_sigterm_stops_every_replica_and_deletes_the_cluster(mesh: LaunchedMesh) -> None:
    cluster_dir = mesh.postgres_dir
    assert cluster_dir is not None and cluster_dir.exists()
    tree = psutil.Process(mesh.process.pid).children(recursive=True)
    mesh.process.send_signal(signal.SIGTERM)
    mesh.process.wait(timeout=STOP_TIMEOUT_S + 30)
    assert mesh.process.returncode == 0
    _gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive, [p.cmdline() for p in alive]
    assert not cluster_dir.exists()
    _assert_nothing_listens(postgres_port(mesh.base))


def _assert_nothing_listens(port: int) -> None:
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, f"something still listens on {port}"


# --- failed starts --------------------------------------------------------------------------------------------


def _blocking(port: int) -> socket.socket:
    """A listener on ``port`` that servers cannot share (no SO_REUSEPORT)."""
    blocker = socket.socket()
    blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    blocker.bind(("127.0.0.1", port))
    blocker.listen(1)
    return blocker


def _failed_start(tmp_path: Path, blocked: str) -> str:
    """Start a replicated mesh with ``blocked``'s port taken; the launcher's output."""
    if find_pg_bin() is None:
        skip_or_fail("PostgreSQL server binaries not found (install the postgresql package or set LLMESH_PG_BIN)")
    base = launcher_port_base(replicas=2, db="postgres")
    plan = _by_name(plan_children(tmp_path, base, 1, None, replicas=2, db="postgres"))
    port = postgres_port(base) if blocked == "postgres" else plan[blocked].port
    with _blocking(port), pytest.raises(RuntimeError) as caught, \
            launched_mesh(tmp_path, tls=False, replicas=2, db="postgres", env=CHEAP_INFERENCE_ENV, port_base=base):
        pass
    output = str(caught.value)
    cluster = re.search(r"/tmp/llmesh-pg-\w+", output)
    assert cluster is not None, output
    assert not Path(cluster.group(0)).exists(), output
    if blocked != "postgres":
        _assert_nothing_listens(postgres_port(base))
    assert "llmesh stopped" in output
    # The launcher has exited: no service it started (each names the data dir) runs on.
    leftovers = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                 if str(tmp_path) in " ".join(p.info["cmdline"] or ())]
    assert not leftovers, leftovers
    return output


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.model
@pytest.mark.timeout(600)
def test_a_replica_that_cannot_start_stops_the_mesh_and_its_cluster(tmp_path: Path) -> None:
    output = _failed_start(tmp_path, "store-2")
    assert "store-2 exited with code" in output


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.timeout(600)
def test_a_cluster_that_cannot_start_leaves_nothing_and_starts_no_service(tmp_path: Path) -> None:
    output = _failed_start(tmp_path, "postgres")
    assert "PostgreSQL did not start" in output and "pg_ctl start exited" in output
    assert not (tmp_path / "logs").exists(), "no service was started"
