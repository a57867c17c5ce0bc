"""The mesh the load scenarios drive: every service a child process on loopback.

Inference nodes run their synthetic backend (a fixed-rate token stream, see
docs/inference.md), so what is measured is the mesh, not the model. The
children are started and stopped with the launcher's own code, so the load
runs the same processes ``make run`` does.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from services.common.identity import Identity
from services.launcher import Child, Launcher, plan_children
from tests.support.auth import client_identity, service_identity
from tests.support.ports import free_launcher_port_base


@dataclass(frozen=True)
class MeshOptions:
    nodes: int = 1
    tokens_per_s: float = 50.0
    # Sequences per node: the scenarios want the node never to queue.
    seqs_per_node: int = 512
    max_active_runs: int = 1024
    # Tokens per synthetic step (n_batch): whole prompts of many sessions at once.
    batch_tokens: int = 65536
    saved_state_max_mb: int = 8
    data_dir: str = ""


def mesh_env(options: MeshOptions) -> dict[str, str]:
    return {
        "LLMESH_INFERENCE_BACKEND": "synthetic",
        "LLMESH_INFERENCE_SYNTHETIC_TOKENS_PER_S": str(options.tokens_per_s),
        "LLMESH_INFERENCE_N_SEQ_MAX": str(options.seqs_per_node),
        "LLMESH_INFERENCE_MAX_QUEUE": str(options.seqs_per_node * 4),
        "LLMESH_INFERENCE_N_CTX": str(max(8192, options.seqs_per_node * 1024)),
        # A synthetic step costs the same whatever it carries, so a large batch
        # makes prompts (each S1 session's first is ~2,700 byte tokens of tool
        # descriptions) as cheap as the fixed-rate stream means them to be.
        "LLMESH_INFERENCE_N_BATCH": str(options.batch_tokens),
        # Every S1 turn opens a session, so evicted sessions' saved states pile
        # up to this budget; a small one reaches its plateau early in a soak.
        "LLMESH_INFERENCE_SAVED_STATE_MAX_MB": str(options.saved_state_max_mb),
        "LLMESH_ORCHESTRATOR_MAX_ACTIVE_RUNS": str(options.max_active_runs),
        "LLMESH_ORCHESTRATOR_MAX_WORKERS": "0",
        "LLMESH_STORE_SQLITE_SYNCHRONOUS": "NORMAL",
        "LLMESH_TOOLS_SANDBOX": "none",
        "LLMESH_TOOLS_SANDBOX_UID": "-1",
        "LLMESH_TOOLS_SANDBOX_GID": "-1",
        "LLMESH_TOOLS_MAX_CONCURRENT_CALLS": "64",
        "LLMESH_LOG_LEVEL": "WARNING",
    }


@dataclass
class Mesh:
    children: list[Child]
    data_dir: Path

    def target(self, name: str) -> str:
        return next(c.target for c in self.children if c.name == name)

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    @property
    def credentials(self) -> Path:
        """The children's credentials directory (the launcher's LLMESH_CREDENTIALS_DIR)."""
        return self.data_dir / "credentials"

    def service_identity(self, service: str) -> Identity:
        """What the load presents when it stands in for ``service`` (e.g. the orchestrator, for the store)."""
        # The children serve plaintext (plan_children without tls), whatever the test run uses.
        return service_identity(service, self.credentials, tls=False)

    def client_identity(self, tenant: str) -> Identity:
        """A client key of ``tenant`` (made on first use; the children accept it at once)."""
        return client_identity(tenant, credentials=self.credentials, tls=False)

    def pids(self) -> dict[str, int]:
        return {c.name: c.process.pid for c in self.children if c.process is not None}

    def metric(self, name: str, child: str) -> float:
        """Sum of all samples of ``name`` on one child's /metrics."""
        port = self.child(child).metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
            text = reply.read().decode()
        total = 0.0
        for line in text.splitlines():
            match = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? ([0-9.eE+-]+)$", line)
            if match:
                total += float(match.group(2))
        return total


@contextlib.asynccontextmanager
async def running_mesh(options: MeshOptions = MeshOptions()) -> AsyncIterator[Mesh]:
    data_dir = Path(options.data_dir or tempfile.mkdtemp(prefix="llmesh-load-"))
    # Every port of the plan is reserved: see tests/support/ports.py.
    children = plan_children(data_dir, free_launcher_port_base(options.nodes), options.nodes)
    extra = mesh_env(options)
    for child in children:
        child.extra_env.update(extra)
    saved = {k: os.environ.get(k) for k in extra}
    launcher = Launcher(children, data_dir, ready_timeout_s=60)
    try:
        await launcher.start_all()
        yield Mesh(children, data_dir)
    finally:
        launcher.stop_all()
        for key, value in saved.items():
            if value is not None:
                os.environ[key] = value
        if not options.data_dir:
            # A soak leaves hundreds of MB of database behind; a named data_dir is kept.
            shutil.rmtree(data_dir, ignore_errors=True)
