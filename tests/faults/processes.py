"""Services as child processes, so a test can kill them like an operator's bad day would."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.auth import CREDENTIALS, open_channel
from tests.support.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
# argv: SETUP (module:function) MODULE ARGS... Calls SETUP in the child, then runs MODULE as ``python -m`` would.
_SETUP_THEN_RUN = """
import importlib, runpy, sys
module, _, function = sys.argv[1].partition(":")
getattr(importlib.import_module(module), function)()
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


class ServiceProcess:
    """``python -m services.<name>`` on a fixed port, restartable on the same data dir.

    ``preexec``, a module-level function, runs in the child before the
    service does: after exec, never as a ``preexec_fn`` between fork and exec,
    where Python code in a process with gRPC threads (this one) can crash the
    child before it execs.
    """

    def __init__(self, name: str, full_name: str, data_dir: Path, args: Sequence[str] = (),
                 env: dict[str, str] | None = None, preexec: Callable[[], None] | None = None,
                 credentials: Path = ROOT / CREDENTIALS) -> None:
        self.name, self.full_name, self.data_dir = name, full_name, data_dir
        # Where the service finds its key and everyone's hashes: by default the directory the
        # tests' own clients and in-process services use, so they all know each other.
        self.credentials = credentials
        self.args, self.env, self.preexec = list(args), env or {}, preexec
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / f"{name}.log"

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 30.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "LLMESH_LOG_LEVEL": "WARNING", **self.env}
        service = [f"services.{self.name}", "--port", str(self.port), "--data-dir", str(self.data_dir),
                   "--credentials-dir", str(self.credentials), *self.args]
        if self.preexec is None:
            command = [sys.executable, "-m", *service]
        else:
            setup = f"{self.preexec.__module__}:{self.preexec.__qualname__}"
            command = [sys.executable, "-c", _SETUP_THEN_RUN, setup, *service]
        with self.log_path.open("ab") as log:
            self.process = await asyncio.to_thread(subprocess.Popen, command, cwd=ROOT, env=env, stdout=log,
                                                   stderr=subprocess.STDOUT)
        await self.wait_serving(timeout_s)

    async def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        async with open_channel(self.target, self.credentials) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                assert self.process is not None and self.process.poll() is None, self.last_log()
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(service=self.full_name), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.aio.AioRpcError:
                    pass
                await asyncio.sleep(0.1)  # start-up only
        raise TimeoutError(f"{self.name} not serving after {timeout_s}s\n{self.last_log()}")

    def kill(self) -> None:
        """SIGKILL: no drain, no flush, no goodbye."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def last_log(self, num_chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-num_chars:] if self.log_path.exists() else ""
