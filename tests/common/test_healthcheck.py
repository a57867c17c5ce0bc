"""The exec-probe health check against an in-process service with auth on, in plaintext and with mutual TLS."""
from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from services.common import healthcheck
from services.common.identity import init_tls
from services.common.runtime import RunningService, running_service
from services.common.settings import ServerSettings
from tests.support.auth import own_transport

STORE = "llmesh.store.v1.StoreService"
ROOT = Path(__file__).resolve().parents[2]


class HealthOnlyApp:
    """A service named like the store that serves nothing but health and reflection."""

    service_names = (STORE,)

    def register(self, server: grpc.aio.Server) -> None:
        pass

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass


@pytest.fixture(params=[False, True], ids=["plaintext", "mtls"])
async def service(request, tmp_path: Path) -> AsyncIterator[tuple[RunningService, dict[str, str]]]:
    credentials = tmp_path / "credentials"
    tls = request.param
    if tls:
        init_tls(credentials)
    with own_transport():  # each transport in every run, `make test-tls` too
        settings = ServerSettings(port=0, data_dir=str(tmp_path), credentials_dir=str(credentials),
                                  auth_enabled=True, tls_enabled=tls)
    environ = {"LLMESH_CREDENTIALS_DIR": str(credentials), "LLMESH_TLS_ENABLED": str(tls).lower()}
    async with running_service(HealthOnlyApp(), settings) as running:
        yield running, environ


async def probe(args: list[str], environ: dict[str, str]) -> int:
    def run() -> int:
        # The probe's settings come from ``environ`` alone, as in the probe's process.
        with own_transport():
            return healthcheck.main(args, environ)

    # main() runs its own event loop, as in the probe's process.
    return await asyncio.to_thread(run)


async def test_serving_service_and_live_process_exit_0(service) -> None:
    running, environ = service
    port = str(running.port)
    assert await probe(["--port", port, "--service", STORE], environ) == 0
    assert await probe(["--port", port, "--service", STORE, "--identity", "store"], environ) == 0
    assert await probe(["--port", port, "--identity", "store"], environ) == 0, "liveness: the empty name"


async def test_draining_unknown_or_unreachable_exit_1(service) -> None:
    running, environ = service
    port = str(running.port)
    assert await probe(["--port", port, "--service", "llmesh.nothing.v1.Nothing", "--identity", "store"],
                       environ) == 1
    await running.health.enter_graceful_shutdown()
    assert await probe(["--port", port, "--service", STORE], environ) == 1
    await running.server.stop(0)
    assert await probe(["--port", port, "--identity", "store", "--timeout-s", "1"], environ) == 1


async def test_the_wrong_transport_is_not_serving(service) -> None:
    running, environ = service
    tls_on = environ["LLMESH_TLS_ENABLED"] == "true"
    if tls_on:
        # A plaintext probe cannot talk to a TLS port.
        wrong = {**environ, "LLMESH_TLS_ENABLED": "false"}
    else:
        # A TLS probe cannot talk to a plaintext port (and here has no files either).
        wrong = {**environ, "LLMESH_TLS_ENABLED": "true"}
    assert await probe(["--port", str(running.port), "--service", STORE, "--timeout-s", "1"], wrong) == 1


async def test_with_tls_a_probe_without_the_pods_certificate_is_refused(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    init_tls(credentials, names=("store",))
    settings = ServerSettings(port=0, data_dir=str(tmp_path), credentials_dir=str(credentials), tls_enabled=True)
    environ = {"LLMESH_CREDENTIALS_DIR": str(credentials), "LLMESH_TLS_ENABLED": "true"}
    async with running_service(HealthOnlyApp(), settings) as running:
        port = str(running.port)
        assert await probe(["--port", port, "--identity", "store"], environ) == 0
        assert await probe(["--port", port, "--identity", "policy"], environ) == 1, "no such certificate"
        with pytest.raises(SystemExit):
            await probe(["--port", port], environ)  # TLS on: the identity must be named


async def test_the_module_runs_as_an_exec_probe(service) -> None:
    running, environ = service
    env = {**os.environ, **environ}
    command = [sys.executable, "-m", "services.common.healthcheck", "--port", str(running.port),
               "--service", STORE, "--identity", "store"]
    done = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=60)
    assert done.returncode == 0, done.stderr
    await running.health.enter_graceful_shutdown()
    done = await asyncio.to_thread(subprocess.run, command, cwd=ROOT, env=env, capture_output=True, text=True,
                                   timeout=60)
    assert done.returncode == 1 and "NOT_SERVING" in done.stderr
