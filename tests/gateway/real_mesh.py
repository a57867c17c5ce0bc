"""The whole mesh in this process: store, policy, tools, inference (real model), orchestrator, REST gateway.

Every service runs through its own ``build_app`` on port 0 with data under a
temporary folder; the targets are wired through each service's Settings, as
``make run`` does across processes.
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import httpx

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.gateway.config import Settings as GatewaySettings
from services.gateway.server import build_app as build_gateway
from services.gateway.server import running_gateway

TENANT = "acme"
# A cheap KDF cost keeps start-up fast; production uses the default cost.
TEST_SCRYPT_N = 2**10


@dataclass
class RealMesh:
    url: str
    api_key: str
    orchestrator_target: str

    def client(self, **kwargs) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers={"Authorization": f"Bearer {self.api_key}"},
                                 timeout=60, **kwargs)


def _settings(name: str, **fields):
    return importlib.import_module(f"services.{name}.config").Settings(**fields)


@contextlib.asynccontextmanager
async def running_real_mesh(data_dir: Path, model_path: Path) -> AsyncIterator[RealMesh]:
    async with contextlib.AsyncExitStack() as stack:
        async def start(name: str, **fields) -> str:
            settings = _settings(name, port=0, data_dir=str(data_dir / name), **fields)
            app = importlib.import_module(f"services.{name}.server").build_app(settings)
            svc = await stack.enter_async_context(running_service(app, settings))
            return f"127.0.0.1:{svc.port}"

        store = await start("store", sqlite_synchronous="NORMAL")
        policy = await start("policy", store_target=store, audit_backend="store")
        tools = await start("tools", policy_target=policy,
                            workspace_root=str(data_dir / "ws"), sandbox_uid=-1, sandbox_gid=-1)
        # A small context and two sequences keep the model's KV memory and load time low.
        inference = await start("inference", model_path=str(model_path), n_ctx=2048, n_seq_max=2, n_threads=2,
                                n_gpu_layers=0)
        orchestrator = await start("orchestrator", store_target=store, policy_target=policy, tools_target=tools,
                                   inference_target=inference, event_batch_ms=5)
        api_key, record = generate_api_key(TENANT, n=TEST_SCRYPT_N)
        authenticator = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter(max_failures=5, window_s=60))
        stack.callback(authenticator.close)
        gateway = build_gateway(GatewaySettings(port=0, orchestrator_target=orchestrator, inference_target=inference,
                                                tools_target=tools, policy_target=policy),
                                authenticator=authenticator)
        url = await stack.enter_async_context(running_gateway(gateway))
        yield RealMesh(url, api_key, orchestrator)
