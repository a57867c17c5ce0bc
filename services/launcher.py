"""Start the whole mesh on loopback: ``python -m services.launcher`` (``make run``).

Starts every service as a child process with its logs in ``<data>/logs``,
waits until each reports SERVING on its readiness health check, prints a table
of endpoints, and stops every child on Ctrl-C or SIGTERM. A child that dies is
reported by name with its last log lines and the mesh is stopped: nothing
fails silently.

``--replicas N`` (``make run REPLICAS=2``) starts N replicas each of the
orchestrator, policy and tools (and of the store on PostgreSQL); every
service reaches a replicated one through a target listing all its replicas,
which its channel calls round robin. ``--db postgres`` first starts a
throw-away PostgreSQL cluster (services/postgres_cluster.py) for the store,
and stops and deletes it when the mesh stops. A replica that dies while
another of its service still runs is reported and the mesh goes on.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import make_channel
from services.common.identity import Identity, tls_files
from services.postgres_cluster import PostgresCluster, PostgresUnavailable, database_url, postgres_cluster

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 8.0
# ``python -m services.launcher --child-of PID MODULE ARGS...`` runs MODULE as a child of PID.
CHILD_FLAG = "--child-of"


@dataclass(frozen=True)
class ServiceDef:
    name: str
    module: str
    full_name: str
    port_offset: int
    depends_on: tuple[str, ...] = ()
    # "grpc": ready when its health check says SERVING; "http": when /healthz answers.
    kind: str = "grpc"


SERVICES: tuple[ServiceDef, ...] = (
    ServiceDef("store", "services.store", "llmesh.store.v1.StoreService", 4),
    ServiceDef("policy", "services.policy", "llmesh.policy.v1.PolicyService", 3, ("store",)),
    ServiceDef("tools", "services.tools", "llmesh.tools.v1.ToolService", 2, ("policy",)),
    ServiceDef("inference", "services.inference", "llmesh.inference.v1.InferenceService", 0),
    ServiceDef("orchestrator", "services.orchestrator", "llmesh.orchestrator.v1.AgentService", 1,
               ("store", "policy", "tools", "inference")),
)
GATEWAY = ServiceDef("gateway", "services.gateway", "REST/SSE + OpenAI-compatible HTTP", 0,
                     ("orchestrator", "tools", "policy", "inference"), kind="http")
DEV_KEY_FILE = "dev_api_key"
#: Services that run as several replicas with --replicas (the store only on PostgreSQL).
REPLICATED = ("store", "policy", "tools", "orchestrator")
#: Replica r (from 1) of a service listens on port_base + its offset + (r - 1) * REPLICA_PORT_STRIDE
#: (metrics 100 above, as for every service), clear of inference nodes 2..10 at port_base + 12..20.
REPLICA_PORT_STRIDE = 20
#: The throw-away PostgreSQL cluster of --db postgres listens on port_base + POSTGRES_PORT_OFFSET.
POSTGRES_PORT_OFFSET = 8
POSTGRES_DATABASE = "llmesh"
DATABASES = ("sqlite", "postgres")


@dataclass
class Child:
    name: str
    service: ServiceDef
    port: int
    metrics_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    ready: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Which replica of its service this is, from 1.
    replica: int = 1

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def last_log_lines(self, n: int = 20) -> list[str]:
        try:
            with self.log_path.open("r", encoding="utf-8", errors="replace") as f:
                return list(deque(f, maxlen=n))
        except FileNotFoundError:
            return []


def _die_with_parent() -> None:
    """Children get SIGTERM if the launcher itself is killed: no orphans."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def child_command(module: str, args: list[str]) -> list[str]:
    """``python -m <module> <args>``, run so that the child gets SIGTERM when this process dies.

    The child asks for that signal itself, after exec (``run_child``). A
    ``preexec_fn`` would run Python between fork and exec, and in a process
    with gRPC threads (the launcher's health checks) gRPC's fork handlers
    then crash a share of the children before they exec.
    """
    return [sys.executable, "-m", "services.launcher", CHILD_FLAG, str(os.getpid()), module, *args]


def run_child(argv: list[str]) -> None:
    """The child side of ``child_command``: ``argv`` is PID MODULE ARGS..."""
    parent, module, *args = argv
    _die_with_parent()
    if os.getppid() != int(parent):
        sys.exit(f"{module}: the launcher (pid {parent}) exited before this child started")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def postgres_port(port_base: int) -> int:
    return port_base + POSTGRES_PORT_OFFSET


def plan_children(data_dir: Path, port_base: int, nodes: int, http_port: int | None = None,
                  tls: bool = False, replicas: int = 1, db: str = "sqlite") -> list[Child]:
    """Every child of the mesh, with its ports and environment; ValueError for a layout that cannot run."""
    if replicas < 1 or nodes < 1:
        raise ValueError(f"--replicas ({replicas}) and --nodes ({nodes}) must be at least 1")
    if db not in DATABASES:
        raise ValueError(f"--db {db!r}: expected one of {', '.join(DATABASES)}")
    children: list[Child] = []
    node_ports = [port_base] + [port_base + 10 + i for i in range(1, nodes)]
    for svc in SERVICES:
        if svc.name == "inference":
            for i, port in enumerate(node_ports):
                name = "inference" if nodes == 1 else f"inference-{i + 1}"
                children.append(Child(name, svc, port, port + 100, data_dir / "logs" / f"{name}.log"))
            continue
        # SQLite is one process's file: its store stays a single replica.
        count = 1 if svc.name not in REPLICATED or (svc.name == "store" and db == "sqlite") else replicas
        for replica in range(1, count + 1):
            port = port_base + svc.port_offset + (replica - 1) * REPLICA_PORT_STRIDE
            name = svc.name if count == 1 else f"{svc.name}-{replica}"
            children.append(Child(name, svc, port, port + 100, data_dir / "logs" / f"{name}.log", replica=replica))
    if http_port is not None:
        children.append(Child("gateway", GATEWAY, http_port, port_base + 109, data_dir / "logs" / "gateway.log"))
    _check_ports(children, postgres_port(port_base) if db == "postgres" else None)
    # A replicated service's target lists every replica: its callers' channels spread calls round robin.
    targets = {name: ",".join(c.target for c in children if c.service.name == name)
               for name in {c.service.name for c in children}}
    inference_nodes = targets["inference"]
    wiring = {
        "LLMESH_STORE_TARGET": targets["store"],
        "LLMESH_POLICY_TARGET": targets["policy"],
        "LLMESH_TOOLS_TARGET": targets["tools"],
        "LLMESH_INFERENCE_TARGET": f"127.0.0.1:{node_ports[0]}",  # there is always a first node
        "LLMESH_INFERENCE_NODES": inference_nodes,
        "LLMESH_ORCHESTRATOR_TARGET": targets["orchestrator"],
        # Every child authenticates with its own key from here and reports refused calls to policy.
        "LLMESH_CREDENTIALS_DIR": str(data_dir / "credentials"),
        "LLMESH_AUDIT_TARGET": targets["policy"],
        "LLMESH_TLS_ENABLED": "true" if tls else "false",
    }
    counts = {name: sum(c.service.name == name for c in children) for name in targets}
    for child in children:
        child.extra_env = dict(wiring)
        kind = child.service.name
        if kind == "inference":
            child.extra_env["LLMESH_INFERENCE_NODE_ID"] = child.name
        if kind == "store" and db == "postgres":
            child.extra_env["LLMESH_STORE_DATABASE_URL"] = database_url(postgres_port(port_base), POSTGRES_DATABASE)
        if kind in REPLICATED and counts[kind] > 1:
            child.extra_env.update(_replica_env(child))
    return children


def _replica_env(child: Child) -> dict[str, str]:
    """What sets one replica apart: its name in task claims and locks, and a trace file of its own
    (replicas share the data dir; their span batches would interleave in one file). Set ones win."""
    svc = child.service.name.upper()
    env: dict[str, str] = {}
    if not {"LLMESH_TRACE_FILE", f"LLMESH_{svc}_TRACE_FILE"} & os.environ.keys():
        env[f"LLMESH_{svc}_TRACE_FILE"] = f"traces/{child.name}.jsonl"
    named = {"LLMESH_REPLICA_ID", "LLMESH_ORCHESTRATOR_REPLICA_ID"} & os.environ.keys()
    if child.service.name == "orchestrator" and not named:
        env["LLMESH_ORCHESTRATOR_REPLICA_ID"] = child.name
    return env


def _check_ports(children: list[Child], postgres: int | None) -> None:
    owners: dict[int, str] = {} if postgres is None else {postgres: "postgres"}
    for child in children:
        for port in (child.port, child.metrics_port):
            if port in owners:
                raise ValueError(f"port {port} is both {owners[port]}'s and {child.name}'s: use fewer --nodes or "
                                 "--replicas, or another --port-base or --http-port")
            owners[port] = child.name


class Launcher:
    def __init__(self, children: list[Child], data_dir: Path, ready_timeout_s: float, tls: bool = False) -> None:
        self.children = children
        self.data_dir = data_dir
        self.tls = tls
        self.ready_timeout_s = ready_timeout_s
        self.stop_requested = asyncio.Event()
        self.failed: Child | None = None

    def spawn(self, child: Child) -> None:
        child.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **child.extra_env, "PYTHONUNBUFFERED": "1"}
        args = child_command(child.service.module, ["--port", str(child.port), "--metrics-port",
                                                    str(child.metrics_port), "--data-dir", str(self.data_dir)])
        log = child.log_path.open("ab")
        child.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        child.ready = False
        log.close()

    async def wait_ready(self, child: Child) -> None:
        if child.service.kind == "http":
            await self._wait_http_ready(child)
            return
        deadline = time.monotonic() + self.ready_timeout_s
        # Health is open to anyone, but with TLS on the launcher still needs a certificate.
        tls = tls_files(self.data_dir / "credentials", "client") if self.tls else None
        async with make_channel(child.target, Identity("launcher", None, tls), traced=False) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if child.process is not None and child.process.poll() is not None:
                    raise ChildDied(child)
                try:
                    reply = await stub.Check(health_pb2.HealthCheckRequest(service=child.service.full_name), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        child.ready = True
                        return
                except grpc.aio.AioRpcError:
                    pass
                # Start-up only: a short wait between probes is fine here.
                await asyncio.sleep(0.2)
        raise TimeoutError(f"{child.name} not ready after {self.ready_timeout_s:.0f}s")

    async def _wait_http_ready(self, child: Child) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://{child.target}/healthz"
        while time.monotonic() < deadline:
            if child.process is not None and child.process.poll() is not None:
                raise ChildDied(child)
            try:
                await asyncio.to_thread(urllib.request.urlopen, url, timeout=1)
                child.ready = True
                return
            except OSError:
                await asyncio.sleep(0.2)  # start-up only
        raise TimeoutError(f"{child.name} not ready after {self.ready_timeout_s:.0f}s")

    def _may_start(self, child: Child) -> bool:
        """Once every replica of each service it depends on is ready; a second replica once the
        first is (so one-time set-up, such as migrations or key files, happens in one process)."""
        for other in self.children:
            if other.service.name in child.service.depends_on and not other.ready:
                return False
            if other.service is child.service and other.replica < child.replica and not other.ready:
                return False
        return True

    async def start_all(self) -> None:
        pending = list(self.children)
        waiting: dict[asyncio.Future[None], Child] = {}
        try:
            while pending or waiting:
                for child in [c for c in pending if self._may_start(c)]:
                    pending.remove(child)
                    self.spawn(child)
                    waiting[asyncio.ensure_future(self.wait_ready(child))] = child
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    del waiting[future]
                    future.result()
        finally:
            for future in waiting:
                future.cancel()

    def _replicas_alive(self, service: ServiceDef) -> list[Child]:
        return [c for c in self.children
                if c.service is service and c.process is not None and c.process.poll() is None]

    async def watch(self) -> None:
        """Resolve when a stop is requested or a child exits on its own, unless that child is a replica
        of a service with another replica still running: that one is reported and the mesh goes on."""
        loop = asyncio.get_running_loop()
        running = [c for c in self.children if c.process is not None]
        # One thread per child, each blocked in wait(): the default pool may have fewer threads than children.
        # They end once stop_all has stopped every child, so nothing waits for them here.
        pool = ThreadPoolExecutor(max_workers=max(1, len(running)), thread_name_prefix="launcher-wait")
        # Futures of different results (the stop event's bool, each child's exit code).
        exits: dict[asyncio.Future[Any], Child] = {
            loop.run_in_executor(pool, c.process.wait): c for c in running if c.process is not None}
        stop_task = asyncio.ensure_future(self.stop_requested.wait())
        try:
            while self.failed is None:
                done, _ = await asyncio.wait([stop_task, *exits], return_when=asyncio.FIRST_COMPLETED)
                if stop_task in done:
                    break
                for future in done:
                    child = exits.pop(future)
                    others = self._replicas_alive(child.service)
                    if child.service.name in REPLICATED and others:
                        report_death(child, going_on_with=[c.name for c in others])
                        # As a supervisor would: the replica comes back while its siblings serve,
                        # unless it died before it was ever ready (a crash at start would only loop).
                        if not child.ready:
                            print(f"!! {child.name} is not restarted: it died before it was ready",
                                  file=sys.stderr, flush=True)
                            continue
                        self.spawn(child)
                        if child.process is not None:
                            exits[loop.run_in_executor(pool, child.process.wait)] = child
                            asyncio.ensure_future(self._report_restart(child))
                    elif self.failed is None:
                        self.failed = child
        finally:
            stop_task.cancel()
            pool.shutdown(wait=False)

    async def _report_restart(self, child: Child) -> None:
        try:
            await self.wait_ready(child)
        except (ChildDied, TimeoutError) as exc:
            print(f"!! {child.name} did not come back: {exc}", file=sys.stderr, flush=True)
            return
        print(f"{child.name} restarted and ready at {child.target}", flush=True)

    def stop_all(self) -> None:
        alive = [(c, p) for c in self.children if (p := c.process) is not None and p.poll() is None]
        for _, process in reversed(alive):
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for child, process in alive:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                process.wait(remaining)
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in time; killing it", file=sys.stderr)
                process.kill()
                process.wait()


class ChildDied(Exception):
    def __init__(self, child: Child) -> None:
        # The message carries the log tail: a caller may delete the data dir before anyone reads the log.
        code = child.process.returncode if child.process else None
        super().__init__(f"{child.name} exited with code {code}; last log lines:\n"
                         + "".join(child.last_log_lines(10)))
        self.child = child


def report_death(child: Child, going_on_with: list[str] | None = None) -> None:
    code = child.process.returncode if child.process else None
    print(f"\n!! {child.name} exited with code {code}; last log lines ({child.log_path}):", file=sys.stderr)
    for line in child.last_log_lines():
        print("   " + line.rstrip(), file=sys.stderr)
    if going_on_with:
        print(f"!! the mesh goes on with {', '.join(going_on_with)}", file=sys.stderr, flush=True)


def print_table(children: list[Child], data_dir: Path, tls: bool = False,
                cluster: PostgresCluster | None = None) -> None:
    print("\nllmesh is up (Ctrl-C stops it):\n")
    print(f"  {'service':<14} {'address':<22} {'metrics':<32} log")
    for c in children:
        address = "http://" + c.target if c.service.kind == "http" else c.target
        metrics = f"http://127.0.0.1:{c.metrics_port}/metrics"
        print(f"  {c.name:<14} {address:<22} {metrics:<32} {c.log_path}")
    if cluster is not None:
        print(f"  {'postgres':<14} {'127.0.0.1:' + str(cluster.port):<22} {'-':<32} {cluster.log_path}")
    replicated = sorted({c.service.name for c in children if c.replica > 1})
    if replicated:
        print("\n  each call may land on any replica: services (and services.common.clients.make_channel)"
              " dial these targets round robin")
        for name in replicated:
            print(f"  {name:<14} {','.join(c.target for c in children if c.service.name == name)}")
    if cluster is not None:
        print(f"\n  database: {cluster.url(POSTGRES_DATABASE)} (a throw-away cluster, deleted on stop)")
    key_file = data_dir / DEV_KEY_FILE
    key = key_file.read_text().strip() if key_file.exists() else "<key>"
    orchestrator = next((c.target for c in children if c.service.name == "orchestrator"), children[0].target)
    if tls:
        tls_dir = data_dir / "credentials" / "tls"
        transport = f"-cacert {tls_dir}/ca.pem -cert {tls_dir}/client.pem -key {tls_dir}/client-key.pem"
    else:
        transport = "-plaintext"
    print(f"\n  data: {data_dir}")
    print(f"  API key (tenant 'default', gRPC and REST): {key}  (stored in {key_file})")
    print(f"  try: grpcurl {transport} -H 'authorization: Bearer {key}' "
          f"-d '{{\"title\": \"hello\"}}' {orchestrator} llmesh.orchestrator.v1.AgentService/CreateSession")
    print(flush=True)


def prepare_credentials(data_dir: Path, tls: bool) -> str:
    """Every service's key, a client key for tenant 'default' (returned, and kept
    in data/dev_api_key, mode 0600, for the person running the mesh) and, with
    TLS, a local CA and certificates. Existing ones are kept across restarts."""
    from services.common.identity import MESH_SERVICES, client_key, init_tls, service_key

    credentials = data_dir / "credentials"
    for name in MESH_SERVICES:
        service_key(credentials, name)
    if tls:
        init_tls(credentials)
    key = client_key(credentials, "default")
    key_file = data_dir / DEV_KEY_FILE
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


def prepare_data_dir(data_dir_arg: str, tls: bool) -> Path:
    """The data directory, made if missing, with the mesh's credentials in it (blocking: run off the loop)."""
    data_dir = Path(data_dir_arg).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare_credentials(data_dir, tls)
    return data_dir


def start_postgres(stack: contextlib.ExitStack, port: int) -> PostgresCluster:
    """A throw-away cluster with an empty database for the store, stopped and deleted when ``stack`` closes
    (blocking: run off the loop)."""
    import psycopg

    cluster = stack.enter_context(postgres_cluster(port))
    print(f"postgres: a throw-away cluster in {cluster.root} on 127.0.0.1:{port}", flush=True)
    try:
        cluster.create_database(POSTGRES_DATABASE)
    except psycopg.Error as exc:
        raise PostgresUnavailable(f"PostgreSQL on 127.0.0.1:{port} refused to create database "
                                  f"{POSTGRES_DATABASE!r}: {exc}") from None
    return cluster


async def run(args: argparse.Namespace) -> int:
    http_port = args.http_port if args.http_port > 0 else None
    data_dir = await asyncio.to_thread(prepare_data_dir, args.data_dir, args.tls)
    try:
        children = plan_children(data_dir, args.port_base, args.nodes, http_port, tls=args.tls,
                                 replicas=args.replicas, db=args.db)
    except ValueError as exc:
        print(f"!! {exc}", file=sys.stderr)
        return 2
    launcher = Launcher(children, data_dir, args.ready_timeout, tls=args.tls)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, launcher.stop_requested.set)
    rc = 0
    # Holds the PostgreSQL cluster: closed last, after every service has stopped, and on a failed start too.
    database = contextlib.ExitStack()
    try:
        cluster = None
        if args.db == "postgres":
            cluster = await asyncio.to_thread(start_postgres, database, postgres_port(args.port_base))
        start = asyncio.ensure_future(launcher.start_all())
        stop_wait = asyncio.ensure_future(launcher.stop_requested.wait())
        done, _ = await asyncio.wait([start, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            stop_wait.cancel()
            start.result()
            print_table(children, data_dir, args.tls, cluster)
            await launcher.watch()
            if launcher.failed is not None:
                report_death(launcher.failed)
                rc = 1
        else:
            start.cancel()
    except ChildDied as died:
        report_death(died.child)
        rc = 1
    except (TimeoutError, PostgresUnavailable) as exc:
        print(f"!! {exc}", file=sys.stderr)
        rc = 1
    finally:
        launcher.stop_all()
        await asyncio.to_thread(database.close)
    print("llmesh stopped", flush=True)
    return rc


def main() -> None:
    if sys.argv[1:2] == [CHILD_FLAG]:
        run_child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="python -m services.launcher", description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("LLMESH_DATA_DIR", "data"))
    parser.add_argument("--port-base", type=int, default=int(os.environ.get("LLMESH_PORT_BASE", "50051")))
    parser.add_argument("--nodes", type=int, default=int(os.environ.get("NODES", "1")),
                        help="inference nodes to start")
    parser.add_argument("--replicas", type=int, default=int(os.environ.get("REPLICAS", "1")),
                        help="replicas each of the orchestrator, policy and tools, and of the store on PostgreSQL")
    parser.add_argument("--db", choices=DATABASES, default=os.environ.get("DB", "sqlite"),
                        help="the store's database: SQLite under the data dir, or a throw-away PostgreSQL cluster")
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("LLMESH_HTTP_PORT", "8080")),
                        help="REST gateway port; 0 leaves the gateway out")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--tls", action="store_true", default=os.environ.get("TLS", "") not in ("", "0"),
                        help="serve and call with mutual TLS (a local CA under <data>/credentials/tls)")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
