"""The whole mesh in this process: store, policy, tools, inference, orchestrator and, on request, the REST gateway.

Every service runs through its own ``build_app`` on port 0 with its data
under one folder; the targets are wired through each service's Settings, as
``make run`` does across processes. Usage::

    async with running_mesh(tmp_path) as mesh:                    # the bundled model
        reply = await mesh.agent.CreateSession(...)

    async with running_mesh(tmp_path, inference=ScriptedInference([...])) as mesh:
        ...                                                        # no inference service; a scripted port

    async with running_mesh(tmp_path, model_path=path, gateway=True) as mesh:
        async with mesh.client() as http: ...                      # REST with an API key of TENANT

``launched_mesh`` starts it as ``make run`` does instead (the launcher, one
process per service); ``replicated_mesh`` as ``make run REPLICAS=2
DB=postgres`` does, for scenarios across replicas::

    with replicated_mesh(tmp_path) as mesh:
        mesh.target("orchestrator")               # both replicas: make_channel calls them round robin
        mesh.replica_targets("orchestrator")      # each replica's own address, in replica order
        mesh.kill("orchestrator", replica=2)      # SIGKILL one replica; the launcher and the other go on
"""
from __future__ import annotations

import contextlib
import importlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import RunningService, running_service
from services.launcher import POSTGRES_DATABASE, Child, plan_children, postgres_port
from services.postgres_cluster import database_url
from tests.support.auth import TLS, client_channel
from tests.support.ports import free_port_base
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]

TENANT = "acme"
# A cheap KDF cost keeps start-up and key checks fast; production uses the default cost.
TEST_SCRYPT_N = 2**10
# A small context and two sequences on the CPU keep the model's KV memory and load time low.
CHEAP_INFERENCE: dict[str, Any] = {"n_ctx": 2048, "n_seq_max": 2, "n_threads": 2, "n_gpu_layers": 0}
#: The same settings for an inference service started in another process (``launched_mesh(env=...)``).
CHEAP_INFERENCE_ENV = {f"LLMESH_INFERENCE_{name.upper()}": str(value) for name, value in CHEAP_INFERENCE.items()}
#: The gateway's port in a launched mesh, as an offset from its --port-base.
HTTP_OFFSET = 9


@dataclass
class Mesh:
    data_dir: Path
    #: host:port of each gRPC service started, by service name.
    targets: dict[str, str]
    services: dict[str, RunningService]
    #: AgentService stub on a channel to the orchestrator.
    agent: orchestrator_pb2_grpc.AgentServiceStub
    #: REST base URL and an API key of TENANT; empty without the gateway.
    url: str = ""
    api_key: str = ""

    @property
    def workspace(self) -> Path:
        """The tools service's workspace root (``<root>/<tenant>/<session_id>``)."""
        return self.data_dir / "ws"

    @property
    def orchestrator_target(self) -> str:
        return self.targets["orchestrator"]

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        if not self.url:
            raise RuntimeError("the mesh was started without the gateway (gateway=True)")
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                                 timeout=60, **kwargs)


def _settings(name: str, **fields: Any) -> Any:
    return importlib.import_module(f"services.{name}.config").Settings(**fields)


@contextlib.asynccontextmanager
async def running_mesh(data_dir: Path, *, model_path: Path | None = None, inference: Any = None,
                       gateway: bool = False, **orchestrator_fields: Any) -> AsyncIterator[Mesh]:
    """Start the mesh; stop every service on exit.

    ``inference``: an inference port object for the orchestrator instead of
    the inference service (which is then not started). ``model_path``: the
    GGUF the inference service loads (its default otherwise). Further keyword
    arguments are orchestrator settings.
    """
    async with contextlib.AsyncExitStack() as stack:
        targets: dict[str, str] = {}
        services: dict[str, RunningService] = {}

        async def start(name: str, app: Any = None, **fields: Any) -> str:
            settings = _settings(name, port=0, data_dir=str(data_dir / name), **fields)
            if app is None:
                app = importlib.import_module(f"services.{name}.server").build_app(settings)
            elif callable(app):
                app = app(settings)
            services[name] = await stack.enter_async_context(running_service(app, settings))
            targets[name] = f"127.0.0.1:{services[name].port}"
            return targets[name]

        store = await start("store", sqlite_synchronous="NORMAL")
        policy = await start("policy", store_target=store, audit_backend="store")
        tools = await start("tools", policy_target=policy, workspace_root=str(data_dir / "ws"),
                            sandbox_uid=-1, sandbox_gid=-1)
        if inference is None:
            model = {"model_path": str(model_path)} if model_path is not None else {}
            await start("inference", **CHEAP_INFERENCE, **model)
        ports = {"inference": inference} if inference is not None else {}
        build_orchestrator = importlib.import_module("services.orchestrator.server").build_app
        await start("orchestrator", lambda settings: build_orchestrator(settings, **ports),
                    store_target=store, policy_target=policy, tools_target=tools,
                    inference_target=targets.get("inference", ""),
                    **{"event_batch_ms": 5, **orchestrator_fields})
        # Tests drive the agent as a client of TENANT: the tenant comes from the key.
        channel = await stack.enter_async_context(client_channel(targets["orchestrator"], TENANT))
        mesh = Mesh(data_dir, targets, services, orchestrator_pb2_grpc.AgentServiceStub(channel))
        if gateway:
            mesh.url, mesh.api_key = await _start_gateway(stack, targets)
        yield mesh


async def _start_gateway(stack: contextlib.AsyncExitStack, targets: dict[str, str]) -> tuple[str, str]:
    from services.gateway.config import Settings as GatewaySettings
    from services.gateway.server import build_app, running_gateway

    api_key, record = generate_api_key(TENANT, n=TEST_SCRYPT_N)
    authenticator = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter(max_failures=5, window_s=60))
    stack.callback(authenticator.close)
    app = build_app(GatewaySettings(port=0, orchestrator_target=targets["orchestrator"],
                                    inference_target=targets.get("inference", ""), tools_target=targets["tools"],
                                    policy_target=targets["policy"], store_target=targets["store"]),
                    authenticator=authenticator)
    url = await stack.enter_async_context(running_gateway(app))
    return url, api_key


@dataclass
class LaunchedMesh:
    """A mesh started by ``python -m services.launcher`` in child processes, as ``make run`` does."""

    process: subprocess.Popen[str]
    base: int
    data_dir: Path
    #: The launcher's output so far: read on in the background while the mesh runs.
    lines: list[str]
    #: Whether its ports serve mutual TLS (the CA and the clients' certificate under ``credentials``).
    tls: bool = False
    #: The launcher's plan: every child with its name, service, replica number and ports.
    children: list[Child] = field(default_factory=list)
    #: "sqlite" or "postgres" (a throw-away cluster the launcher started).
    db: str = "sqlite"
    #: REST base URL of the gateway; empty without it.
    url: str = ""

    @property
    def credentials(self) -> Path:
        return self.data_dir / "credentials"

    @property
    def dev_key(self) -> str:
        """The client key of tenant ``default`` the launcher prints (``client_channel`` presents it)."""
        return (self.data_dir / "dev_api_key").read_text().strip()

    def replicas(self, service: str) -> list[Child]:
        """The children of ``service`` (inference: its nodes), in replica order."""
        found = [c for c in self.children if c.service.name == service]
        if not found:
            raise KeyError(f"no {service} in this mesh")
        return found

    def replica_target(self, service: str, replica: int = 1) -> str:
        """host:port of one replica (from 1): to reach exactly that one, e.g. to Cancel on the other."""
        return self.replicas(service)[replica - 1].target

    def replica_targets(self, service: str) -> list[str]:
        return [c.target for c in self.replicas(service)]

    def target(self, service: str) -> str:
        """What a client dials for ``service``: its address, or with replicas every replica's address,
        comma-separated, which ``services.common.clients.make_channel`` calls round robin (for a
        channel of another kind, ``services.common.clients.resolve_target`` says how to dial it)."""
        return ",".join(self.replica_targets(service))

    def metrics_url(self, service: str, replica: int = 1) -> str:
        return f"http://127.0.0.1:{self.replicas(service)[replica - 1].metrics_port}/metrics"

    def client_channel(self, service: str = "orchestrator", tenant: str = "default") -> grpc.aio.Channel:
        """An aio channel to ``service`` (round robin over its replicas) presenting a client key of ``tenant``."""
        return client_channel(self.target(service), tenant, credentials=self.credentials, tls=self.tls)

    @property
    def database_url(self) -> str:
        """The store's PostgreSQL database (SQLAlchemy URL); empty on SQLite."""
        return database_url(postgres_port(self.base), POSTGRES_DATABASE) if self.db == "postgres" else ""

    @property
    def postgres_dir(self) -> Path | None:
        """Where the launcher's PostgreSQL cluster lives (deleted when the launcher stops)."""
        for line in self.lines:
            found = re.search(r"throw-away cluster in (\S+) on ", line)
            if found:
                return Path(found.group(1))
        return None

    def pid(self, service: str, replica: int = 1) -> int:
        """The process id of one replica (a child of the launcher, found by its --port)."""
        port = str(self.replicas(service)[replica - 1].port)
        for process in psutil.Process(self.process.pid).children():
            with contextlib.suppress(psutil.Error):
                args = process.cmdline()
                if "--port" in args and args[args.index("--port") + 1] == port:
                    return process.pid
        raise LookupError(f"{service} replica {replica} (port {port}) is not running")

    def kill(self, service: str, replica: int = 1, sig: int = signal.SIGKILL) -> int:
        """Send ``sig`` (SIGKILL by default) to one replica; its pid. The launcher reports it and,
        while another replica of that service runs, keeps the mesh up."""
        pid = self.pid(service, replica)
        os.kill(pid, sig)
        return pid

    async def wait_for_output(self, text: str, timeout_s: float = 30.0) -> bool:
        """Whether the launcher printed a line containing ``text`` within ``timeout_s``."""
        return await wait_until(lambda: any(text in line for line in list(self.lines)), timeout_s, interval_s=0.1)


def launcher_port_base(nodes: int = 1, http: bool = False, replicas: int = 1, db: str = "sqlite") -> int:
    """A --port-base with every port of the launcher's plan reserved (metrics, gateway and PostgreSQL too)."""
    plan = plan_children(Path("unused"), 0, nodes, HTTP_OFFSET if http else None, replicas=replicas, db=db)
    ports = {port for child in plan for port in (child.port, child.metrics_port)}
    if db == "postgres":
        ports.add(postgres_port(0))
    return free_port_base(ports)


@contextlib.contextmanager
def launched_mesh(data_dir: Path, *, tls: bool = TLS, http: bool = False, ready_timeout_s: float = 240.0,
                  replicas: int = 1, db: str = "sqlite", nodes: int = 1,
                  env: Mapping[str, str] | None = None, port_base: int | None = None) -> Iterator[LaunchedMesh]:
    """Start the launcher; SIGTERM its process group on exit (SIGKILL if it lingers).

    ``tls``: mutual TLS on every port (by default as the test run: ``make test-tls``), plaintext otherwise.
    ``replicas``, ``db``, ``nodes``: the launcher's --replicas, --db and --nodes. ``env``: extra
    environment of the launcher and so of every service (settings such as ``CHEAP_INFERENCE_ENV``).
    ``port_base``: the launcher's --port-base (``launcher_port_base`` reserves one); a free one by default.
    Raises RuntimeError with the launcher's output when the mesh does not come up.
    """
    base = port_base if port_base is not None else launcher_port_base(nodes, http, replicas, db)
    http_port = base + HTTP_OFFSET if http else 0
    args = [sys.executable, "-m", "services.launcher", "--data-dir", str(data_dir), "--port-base", str(base),
            "--nodes", str(nodes), "--http-port", str(http_port), "--replicas", str(replicas), "--db", db]
    if tls:
        args.append("--tls")
    # ``tls`` alone decides: the launcher's --tls default would follow TLS from the environment.
    launcher_env = {**os.environ, **(env or {}), "TLS": "1" if tls else "0"}
    process = subprocess.Popen(args, cwd=ROOT, env=launcher_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    lines: list[str] = []
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "Ctrl-C stops it" in line:
                break
        if not any("Ctrl-C stops it" in line for line in lines):
            raise RuntimeError("the launcher did not come up:\n" + "".join(lines[-60:]))
        # The table after the banner, and whatever the launcher reports later, keep arriving in ``lines``;
        # reading on also keeps the launcher from blocking on a full pipe.
        threading.Thread(target=_read_on, args=(process.stdout, lines), daemon=True).start()
        plan = plan_children(data_dir.resolve(), base, nodes, http_port or None, tls=tls, replicas=replicas, db=db)
        yield LaunchedMesh(process, base, data_dir, lines, tls, plan, db,
                           url=f"http://127.0.0.1:{http_port}" if http else "")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _read_on(stream: Any, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)


@contextlib.contextmanager
def replicated_mesh(data_dir: Path, **kwargs: Any) -> Iterator[LaunchedMesh]:
    """``launched_mesh`` as ``make run REPLICAS=2 DB=postgres`` starts it: two replicas each of the
    store, policy, tools and orchestrator on a throw-away PostgreSQL cluster, one cheap inference node
    and the gateway. Keyword arguments override any of these. Skips (fails in CI) without PostgreSQL."""
    from services.postgres_cluster import find_pg_bin
    from tests.support.postgres import skip_or_fail

    if find_pg_bin() is None:
        skip_or_fail("PostgreSQL server binaries not found (install the postgresql package or set LLMESH_PG_BIN)")
    options: dict[str, Any] = {"replicas": 2, "db": "postgres", "http": True, "env": CHEAP_INFERENCE_ENV,
                               "ready_timeout_s": 300.0, **kwargs}
    with launched_mesh(data_dir, **options) as mesh:
        yield mesh
