"""Start the whole mesh on loopback: ``python -m services.launcher`` (``make run``).

Starts every service as a child process with its logs in ``<data>/logs``,
waits until each reports SERVING on its readiness health check, prints a table
of endpoints, and stops every child on Ctrl-C or SIGTERM. A child that dies is
reported by name with its last log lines and the mesh is stopped: nothing
fails silently.
"""
from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import time
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.clients import make_channel
from services.common.identity import Identity, tls_files

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


def plan_children(data_dir: Path, port_base: int, nodes: int, http_port: int | None = None,
                  tls: bool = False) -> list[Child]:
    children: list[Child] = []
    node_ports = [port_base] + [port_base + 10 + i for i in range(1, nodes)]
    for svc in SERVICES:
        if svc.name == "inference":
            for i, port in enumerate(node_ports):
                name = "inference" if nodes == 1 else f"inference-{i + 1}"
                children.append(Child(name, svc, port, port + 100, data_dir / "logs" / f"{name}.log"))
        else:
            port = port_base + svc.port_offset
            children.append(Child(svc.name, svc, port, port + 100, data_dir / "logs" / f"{svc.name}.log"))
    if http_port is not None:
        children.append(Child("gateway", GATEWAY, http_port, port_base + 109, data_dir / "logs" / "gateway.log"))
    targets = {c.service.name: c.target for c in children}
    inference_nodes = ",".join(c.target for c in children if c.service.name == "inference")
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
    for child in children:
        child.extra_env = dict(wiring)
        if child.service.name == "inference":
            child.extra_env["LLMESH_INFERENCE_NODE_ID"] = child.name
    return children


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

    async def start_all(self) -> None:
        started: set[str] = set()
        pending = list(self.children)
        while pending:
            wave = [c for c in pending if all(d in started for d in c.service.depends_on)]
            for child in wave:
                self.spawn(child)
            await asyncio.gather(*(self.wait_ready(c) for c in wave))
            for child in wave:
                started.add(child.service.name)
                pending.remove(child)

    async def watch(self) -> None:
        """Resolve when a child exits on its own or a stop is requested."""
        loop = asyncio.get_running_loop()
        waiters = [loop.run_in_executor(None, c.process.wait) for c in self.children if c.process]
        stop_task = asyncio.ensure_future(self.stop_requested.wait())
        # Futures of different results (the stop event's bool, each child's exit code).
        futures: list[asyncio.Future[Any]] = [stop_task, *waiters]
        done, _ = await asyncio.wait(futures, return_when=asyncio.FIRST_COMPLETED)
        if stop_task not in done:
            self.failed = next(c for c in self.children if c.process and c.process.poll() is not None)
        stop_task.cancel()

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


def report_death(child: Child) -> None:
    code = child.process.returncode if child.process else None
    print(f"\n!! {child.name} exited with code {code}; last log lines ({child.log_path}):", file=sys.stderr)
    for line in child.last_log_lines():
        print("   " + line.rstrip(), file=sys.stderr)


def print_table(children: list[Child], data_dir: Path, tls: bool = False) -> None:
    print("\nllmesh is up (Ctrl-C stops it):\n")
    print(f"  {'service':<14} {'address':<22} {'metrics':<32} log")
    for c in children:
        address = "http://" + c.target if c.service.kind == "http" else c.target
        metrics = f"http://127.0.0.1:{c.metrics_port}/metrics"
        print(f"  {c.name:<14} {address:<22} {metrics:<32} {c.log_path}")
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


async def run(args: argparse.Namespace) -> int:
    http_port = args.http_port if args.http_port > 0 else None
    data_dir = await asyncio.to_thread(prepare_data_dir, args.data_dir, args.tls)
    children = plan_children(data_dir, args.port_base, args.nodes, http_port, tls=args.tls)
    launcher = Launcher(children, data_dir, args.ready_timeout, tls=args.tls)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, launcher.stop_requested.set)
    rc = 0
    try:
        start = asyncio.ensure_future(launcher.start_all())
        stop_wait = asyncio.ensure_future(launcher.stop_requested.wait())
        done, _ = await asyncio.wait([start, stop_wait], return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            stop_wait.cancel()
            start.result()
            print_table(children, data_dir, args.tls)
            await launcher.watch()
            if launcher.failed is not None:
                report_death(launcher.failed)
                rc = 1
        else:
            start.cancel()
    except ChildDied as died:
        report_death(died.child)
        rc = 1
    except TimeoutError as exc:
        print(f"!! {exc}", file=sys.stderr)
        rc = 1
    finally:
        launcher.stop_all()
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
    parser.add_argument("--http-port", type=int, default=int(os.environ.get("LLMESH_HTTP_PORT", "8080")),
                        help="REST gateway port; 0 leaves the gateway out")
    parser.add_argument("--ready-timeout", type=float, default=120.0)
    parser.add_argument("--tls", action="store_true", default=os.environ.get("TLS", "") not in ("", "0"),
                        help="serve and call with mutual TLS (a local CA under <data>/credentials/tls)")
    sys.exit(asyncio.run(run(parser.parse_args())))


if __name__ == "__main__":
    main()
