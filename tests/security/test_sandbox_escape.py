"""The two-call escape: a planted launcher or loader hook must never run as root on the host.

Reproduced end to end before the fix: a call plants a script named
``prlimit`` (or a shared object) in the workspace, and a second call names it
through ``env`` (``PATH`` or ``LD_PRELOAD``), which reached the launcher chain
that runs as root. Here the plant is done as the first call would have left
it, then the second call goes over gRPC (REST offers no route to run tools), and the sandbox is
driven directly with the hostile environment to show the launchers never see
it even when a check upstream is bypassed.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from llmesh.tools.v1 import tools_pb2, tools_pb2_grpc

from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.gateway.config import Settings as GatewaySettings
from services.gateway.server import build_app as build_gateway
from services.gateway.server import running_gateway
from services.tools.adapters.launcher import LAUNCHER_ENV, TRUSTED_DIRS, Launchers, trusted_program
from services.tools.adapters.sandbox import Sandbox, SandboxLimits, detect_mode
from services.tools.config import Settings as ToolsSettings
from services.tools.server import App as ToolsApp
from tests.support.auth import service_channel

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the escape is a root escape: run as root")

LAUNCHER_NAMES = ("prlimit", "bwrap", "setpriv", "env", "sh", "unshare", "true")
TENANT, SESSION = "acme", "victim"




def _plant_launchers(bin_dir: Path, marker: Path) -> None:
    """What the first call left: scripts named like the launchers that record who ran them."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in LAUNCHER_NAMES:
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho \"{name} uid=$(id -u)\" >> {marker}\nexec /usr/bin/{name} \"$@\"\n")
        script.chmod(0o755)


def _build_preload(directory: Path, marker: Path) -> Path:
    """A shared object whose constructor records the uid of every process that loads it."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build the LD_PRELOAD object")
    source = directory / "evil.c"
    source.write_text(
        "#include <stdio.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void hook(void) {\n"
        f"  FILE *f = fopen(\"{marker}\", \"a\");\n"
        "  if (f) { fprintf(f, \"preload uid=%d\\n\", (int)geteuid()); fclose(f); }\n}\n")
    library = directory / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    library.chmod(0o755)
    return library


def _root_lines(marker: Path) -> list[str]:
    if not marker.exists():
        return []
    return [line for line in marker.read_text().splitlines() if line.endswith("uid=0")]


def test_launchers_resolve_to_root_owned_paths_whatever_path_says(base: Path, monkeypatch) -> None:
    marker = base / "ran"
    _plant_launchers(base / "bin", marker)
    monkeypatch.setenv("PATH", f"{base / 'bin'}:{os.environ.get('PATH', '')}")
    launchers = Launchers.resolve()
    for path in (launchers.prlimit, launchers.env, launchers.sh, launchers.setpriv):
        assert os.path.isabs(path) and any(path.startswith(d + "/") for d in TRUSTED_DIRS + ("/usr/bin",))
        assert str(base) not in path
    # A program in a directory others may write is never trusted.
    writable = Path(tempfile.mkdtemp(prefix="llmesh-untrusted-"))
    try:
        writable.chmod(0o777)
        with pytest.raises(RuntimeError, match="writable"):
            from services.tools.adapters.launcher import _check_trusted
            _check_trusted(str(writable))
    finally:
        shutil.rmtree(writable, ignore_errors=True)
    with pytest.raises(RuntimeError):
        trusted_program("llmesh-no-such-program")


@pytest.mark.parametrize("mode", ["bwrap", "unshare", "none"])
async def test_launcher_chain_never_sees_the_callers_environment(base: Path, mode: str) -> None:
    try:
        detect_mode(mode)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    workspace = base / "ws"
    workspace.mkdir(mode=0o700)
    os.chown(workspace, 300_500, 300_500)
    marker = base / "marker.log"
    marker.touch()
    marker.chmod(0o666)
    _plant_launchers(workspace / "bin", marker)
    library = _build_preload(base, marker)
    sandbox = Sandbox(mode, SandboxLimits(cpu_seconds=5, processes=16))
    # Straight to run(): no name check upstream, the hostile variables as they came.
    hostile = {"PATH": f"{workspace / 'bin'}:/usr/bin:/bin", "LD_PRELOAD": str(library), "HOME": "/tmp",
               "LANG": "C.UTF-8"}
    result = await sandbox.run(["/bin/sh", "-c", "echo hello"], workspace, workspace, env=hostile, stdin=None,
                               output_cap_bytes=4096, owner=(300_500, 300_500))
    assert result.exit_code == 0 and result.stdout.text == "hello\n"
    assert _root_lines(marker) == [], marker.read_text()
    if mode != "bwrap":  # (bubblewrap shows the command neither the library nor the marker)
        # The command itself did get the variables, as the session's own uid.
        assert "preload uid=300500" in marker.read_text()


def test_every_launcher_starts_from_an_absolute_path_with_the_fixed_environment(base: Path) -> None:
    sandbox = Sandbox("bwrap" if shutil.which("bwrap") else "none", SandboxLimits())
    env = sandbox.environment(base, {"GREETING": "hi"})
    argv = sandbox.build_argv(["ls"], base, base, env, run_as=(300_001, 300_001), nproc=8, file_size_bytes=1)
    env_link = argv.index(sandbox.launchers.env)
    for item in argv[:env_link]:
        assert "GREETING" not in item
    programs = [argv[0]] + [argv[i + 1] for i, item in enumerate(argv[:env_link]) if item == "--"]
    assert all(os.path.isabs(p) for p in programs if p != "ls")
    assert set(LAUNCHER_ENV) == {"PATH", "LANG"} and str(base) not in LAUNCHER_ENV["PATH"]


@contextlib.asynccontextmanager
async def _tools_service(base: Path) -> AsyncIterator[str]:
    """The tools service with its defaults (uid pool, auto sandbox, cgroups), policy off."""
    settings = ToolsSettings(port=0, data_dir=str(base / "data"), workspace_root=str(base / "ws"))
    async with running_service(ToolsApp(settings), settings) as svc:
        yield f"127.0.0.1:{svc.port}"


def _plant_in_workspace(base: Path) -> tuple[Path, Path, Path]:
    workspace = base / "ws" / TENANT / SESSION
    marker = base / "marker.log"
    marker.touch()
    marker.chmod(0o666)
    _plant_launchers(workspace / "bin", marker)
    return workspace, marker, _build_preload(base, marker)


def _second_calls(workspace: Path, library: Path) -> list[dict]:
    return [{"PATH": f"{workspace / 'bin'}:/usr/bin:/bin"}, {"LD_PRELOAD": str(library)},
            {"BASH_ENV": str(workspace / "bin" / "sh")}, {"PYTHONSTARTUP": str(workspace / "x.py")}]


async def test_two_call_escape_over_grpc_is_refused(base: Path) -> None:
    # As the orchestrator: the one caller the authorisation table lets run tools.
    async with _tools_service(base) as target, service_channel(target, "orchestrator") as channel:
        stub = tools_pb2_grpc.ToolServiceStub(channel)
        first = await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(
            tenant_id=TENANT, session_id=SESSION, request_id="plant", call=tools_pb2.ToolCall(
                call_id="c0", name="shell_exec", arguments_json=json.dumps({"command": "id -u"}))))
        # The workspace's commands run as its own uid, never root.
        assert first.result.stdout.text.strip() not in ("", "0"), first
        workspace, marker, library = _plant_in_workspace(base)
        for number, env in enumerate(_second_calls(workspace, library)):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ExecuteTool(tools_pb2.ExecuteToolRequest(
                    tenant_id=TENANT, session_id=SESSION, request_id=f"r{number}", call=tools_pb2.ToolCall(
                        call_id=f"c{number}", name="shell_exec",
                        arguments_json=json.dumps({"command": "echo hello", "env": env}))))
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert f"$.env.{next(iter(env))}:" in refused.value.details()
        assert _root_lines(marker) == []


async def test_two_call_escape_over_rest_is_refused(base: Path) -> None:
    api_key, record = generate_api_key(TENANT, n=2**10)
    authenticator = ApiKeyAuthenticator(ApiKeyStore([record]), FailedAttemptLimiter(max_failures=5, window_s=60))
    try:
        async with _tools_service(base) as target:
            gateway = build_gateway(GatewaySettings(port=0, tools_target=target), authenticator=authenticator)
            async with running_gateway(gateway) as url, httpx.AsyncClient(
                    base_url=url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
                workspace, marker, library = _plant_in_workspace(base)
                for number, env in enumerate(_second_calls(workspace, library)):
                    # The gateway may not run tools (only the orchestrator may): REST has no such route at all.
                    response = await client.post("/v1/tools:execute", json={
                        "sessionId": SESSION, "requestId": f"r{number}",
                        "call": {"callId": f"c{number}", "name": "shell_exec",
                                 "argumentsJson": json.dumps({"command": "echo hello", "env": env})}})
                    assert response.status_code == 404, response.text
                    assert response.json()["error"]["details"][0]["reason"] == "ROUTE_NOT_FOUND", response.text
                assert _root_lines(marker) == []
    finally:
        authenticator.close()
