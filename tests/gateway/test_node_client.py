"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader from npm) built at test time from our protos.

Against the fake orchestrator it checks the polyglot contract itself; the
agent turn against the real orchestrator is in test_real_mesh.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import grpc_tools
import pytest

from services.common.identity import client_key, tls_files
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from tests.gateway.fakes import FakeAgentApp
from tests.support.auth import CREDENTIALS, TLS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("agent_turn.js")
NPM_PACKAGES = ["@grpc/grpc-js@1", "@grpc/proto-loader@0.8"]
INCLUDE_DIRS = [ROOT / "protos", ROOT / "build" / "third_party", Path(grpc_tools.__file__).parent / "_proto"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def node_client_dir(tmp_path_factory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node and npm are not installed")
    work = tmp_path_factory.mktemp("node-client")
    (work / "package.json").write_text(json.dumps({"name": "llmesh-node-client", "private": True}))
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", *NPM_PACKAGES],
                             cwd=work, capture_output=True, text=True, timeout=240)
    if install.returncode != 0:
        pytest.skip(f"npm install failed (offline?): {install.stderr.strip()[-300:]}")
    shutil.copy(SCRIPT, work / SCRIPT.name)
    return work


async def run_node_turn(work: Path, target: str, api_key: str = "", credentials: Path = CREDENTIALS,
                        tls: bool = TLS) -> dict:
    env = {**os.environ, "LLMESH_API_KEY": api_key}
    if tls:  # the mesh CA and the local clients' certificate under ``credentials``
        files = tls_files(ROOT / credentials, "client")
        env |= {"LLMESH_TLS_CA": str(files.ca), "LLMESH_TLS_CERT": str(files.cert), "LLMESH_TLS_KEY": str(files.key)}
    proc = await asyncio.create_subprocess_exec(
        "node", str(work / SCRIPT.name), target, *map(str, INCLUDE_DIRS), cwd=work, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert out.strip(), err.decode()[-2000:]
    return json.loads(out.decode().strip().splitlines()[-1])


async def test_node_client_runs_a_turn_against_the_contract(node_client_dir):
    app = FakeAgentApp()
    async with running_service(app, ServerSettings(port=0)) as svc:
        result = await run_node_turn(node_client_dir, f"127.0.0.1:{svc.port}", client_key(CREDENTIALS, "acme"))
    assert result["stage"] == "done", result
    events = result["events"]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    assert events[0]["type"] == "EVENT_TYPE_TURN_STARTED" and events[-1]["type"] == "EVENT_TYPE_FINAL"
    # oneof bodies arrive by name: body says which field, value is its content.
    assert "".join(e["value"]["text"] for e in events if e["body"] == "token") == "hello from node "
    run = next(r for name, r in app.service.calls if name == "Run")
    assert (run.options.max_steps, run.request_id) == (2, "node-run-1")
