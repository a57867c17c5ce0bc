"""The whole mesh as `make run` starts it: reflection, health, shutdown."""
from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.launcher import SERVICES

ROOT = Path(__file__).resolve().parents[1]


def _ports_free(base: int) -> bool:
    for port in [base + s.port_offset for s in SERVICES] + [base + 100 + s.port_offset for s in SERVICES]:
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def _free_port_base() -> int:
    for _ in range(50):
        base = random.randrange(20000, 40000, 10)
        if _ports_free(base):
            return base
    raise RuntimeError("no free port range")


def _list_services(target: str) -> set[str]:
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        reply = next(iter(replies))
        return {s.name for s in reply.list_services_response.service}


def _health(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("mesh-data")
    base = _free_port_base()
    env = {**os.environ, "LLMESH_DATA_DIR": str(data_dir), "LLMESH_PORT_BASE": str(base)}
    proc = subprocess.Popen(["make", "-s", "run"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    deadline = time.monotonic() + 240
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if "Ctrl-C stops it" in line:
            break
    else:
        proc.kill()
    if proc.poll() is not None or not any("Ctrl-C stops it" in l for l in lines):
        proc.kill()
        pytest.fail("make run did not come up:\n" + "".join(lines[-60:]))
    yield {"proc": proc, "base": base, "data_dir": data_dir, "lines": lines}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)


def test_every_service_is_listed_by_reflection_and_ready(mesh) -> None:
    for svc in SERVICES:
        target = f"127.0.0.1:{mesh['base'] + svc.port_offset}"
        names = _list_services(target)
        assert svc.full_name in names, (svc.name, names)
        assert "grpc.health.v1.Health" in names
        assert _health(target, "") == health_pb2.HealthCheckResponse.SERVING
        assert _health(target, svc.full_name) == health_pb2.HealthCheckResponse.SERVING


def test_logs_are_json_lines_per_service(mesh) -> None:
    for svc in SERVICES:
        log = Path(mesh["data_dir"]) / "logs" / f"{svc.name}.log"
        assert log.exists(), log
        assert '"event": "serving"' in log.read_text()


def test_sigterm_to_make_run_stops_every_child_quickly(mesh) -> None:
    proc = mesh["proc"]
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= len(SERVICES) + 1, [p.cmdline() for p in tree]
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)
    _gone, alive = psutil.wait_procs(tree, timeout=max(0.1, 10 - (time.monotonic() - started)))
    assert not alive, [p.cmdline() for p in alive]
    assert time.monotonic() - started < 10
