"""Builders for the tool executor tests."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.tools.adapters.fs_tools import FileTools
from services.tools.adapters.sandbox import Sandbox, SandboxLimits, detect_mode
from services.tools.adapters.shell_tool import ShellTool
from services.tools.adapters.uid_pool import SessionUidPool
from services.tools.core.cache import ResultCache
from services.tools.core.executor import ExecutorLimits, ToolExecutor
from services.tools.core.model import CallContext, ToolInvocation
from services.tools.core.ports import PolicyDecision, PolicyQuery, PolicyVerdict
from services.tools.core.registry import ToolRegistry
from services.tools.core.workspace import WorkspaceRoots
from tests.support.waiting import wait_until  # noqa: F401 (the tool tests import it from here)

SANDBOX_UID = 65534 if os.geteuid() == 0 else None
# As root, each session's workspace gets a uid of its own from this range.
TEST_UID_BASE = 300_000


class FakePolicy:
    """Answers from a table keyed by tool name; records every query."""

    def __init__(self, decisions: dict[str, PolicyVerdict] | None = None) -> None:
        self.decisions = decisions or {}
        self.queries: list[PolicyQuery] = []

    async def evaluate(self, query: PolicyQuery) -> PolicyVerdict:
        self.queries.append(query)
        verdict = self.decisions.get(query.tool_name, PolicyVerdict(PolicyDecision.ALLOW))
        if verdict.decision is PolicyDecision.PROMPT and query.approval_id == verdict.approval_id:
            return PolicyVerdict(PolicyDecision.ALLOW, "approved once")
        return verdict


@pytest.fixture
def workspace_base() -> Iterator[Path]:
    # Not under pytest's tmp_path: its parents are 0700, and the sandbox user must get in.
    base = Path(tempfile.mkdtemp(prefix="llmesh-tools-test-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox_mode() -> str:
    return detect_mode("auto")


def make_executor(base: Path, policy: Any = None, *, limits: ExecutorLimits | None = None, sandbox_mode: str = "none",
                  cache_ttl_s: float = 60.0, shell_timeout_ms: int = 10_000,
                  sandbox_limits: SandboxLimits | None = None, workspace_quota_bytes: int = 0) -> ToolExecutor:
    owner = (SANDBOX_UID, SANDBOX_UID)
    pool = SessionUidPool(base, TEST_UID_BASE, 10_000) if SANDBOX_UID is not None else None
    registry = ToolRegistry()
    for spec in FileTools(16 * 1024 * 1024, *owner, workspace_quota_bytes=workspace_quota_bytes).specs():
        registry.add(spec)
    sandbox = Sandbox(sandbox_mode, sandbox_limits or SandboxLimits(cpu_seconds=10, processes=32))
    registry.add(ShellTool(sandbox, shell_timeout_ms, workspace_quota_bytes).spec())
    roots = WorkspaceRoots(base, *owner, allocate_owner=pool.allocate if pool else None)
    return ToolExecutor(registry, policy or FakePolicy(), roots,
                        ResultCache(cache_ttl_s, 256), limits or ExecutorLimits(retry_base_delay_ms=1))


CTX = CallContext(request_id="r1", tenant_id="acme", session_id="s1", role="developer")


def call(name: str, call_id: str = "c1", timeout_ms: int = 0, approval_id: str = "",
         **arguments: Any) -> ToolInvocation:
    import json
    return ToolInvocation(call_id=call_id, name=name, arguments=arguments, arguments_json=json.dumps(arguments),
                          timeout_ms=timeout_ms, approval_id=approval_id)


def workspace_of(base: Path, session_id: str = CTX.session_id) -> Path:
    return base / CTX.tenant_id / session_id


def owner_uid_of(base: Path, session_id: str = CTX.session_id) -> int | None:
    """The uid a session's commands run as (None when the service cannot switch users)."""
    return workspace_of(base, session_id).stat().st_uid if SANDBOX_UID is not None else None
