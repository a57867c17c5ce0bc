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
"""
from __future__ import annotations

import contextlib
import importlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import RunningService, running_service
from tests.support.auth import TLS, client_channel
from tests.support.ports import free_launcher_port_base

ROOT = Path(__file__).resolve().parents[2]

TENANT = "acme"
# A cheap KDF cost keeps start-up and key checks fast; production uses the default cost.
TEST_SCRYPT_N = 2**10


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
            # A small context and two sequences keep the model's KV memory and load time low.
            await start("inference", n_ctx=2048, n_seq_max=2, n_threads=2, n_gpu_layers=0, **model)
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
                                    policy_target=targets["policy"]),
                    authenticator=authenticator)
    url = await stack.enter_async_context(running_gateway(app))
    return url, api_key


@dataclass
class LaunchedMesh:
    """A mesh started by ``python -m services.launcher`` in child processes, as ``make run`` does."""

    process: subprocess.Popen[str]
    base: int
    data_dir: Path
    lines: list[str]
    #: Whether its ports serve mutual TLS (the CA and the clients' certificate under ``credentials``).
    tls: bool = False

    @property
    def credentials(self) -> Path:
        return self.data_dir / "credentials"

    def target(self, service: str) -> str:
        from services.launcher import SERVICES

        offset = next(s.port_offset for s in SERVICES if s.name == service)
        return f"127.0.0.1:{self.base + offset}"


@contextlib.contextmanager
def launched_mesh(data_dir: Path, *, tls: bool = TLS, http: bool = False,
                  ready_timeout_s: float = 240.0) -> Iterator[LaunchedMesh]:
    """Start the launcher with one inference node; kill its process group on exit.

    ``tls``: mutual TLS on every port (by default as the test run: ``make test-tls``), plaintext otherwise.
    """
    base = free_launcher_port_base(nodes=1, http_offset=9 if http else None)
    args = [sys.executable, "-m", "services.launcher", "--data-dir", str(data_dir), "--port-base", str(base),
            "--nodes", "1", "--http-port", str(base + 9 if http else 0)]
    if tls:
        args.append("--tls")
    # ``tls`` alone decides: the launcher's --tls default would follow TLS from the environment.
    env = {**os.environ, "TLS": "1" if tls else "0"}
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)
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
        # The table printed after the banner (key, grpcurl line) is read on demand.
        yield LaunchedMesh(process, base, data_dir, lines, tls)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
