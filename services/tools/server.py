"""Wiring of the tool executor: registry, sandbox, policy, MCP, servicer."""
from __future__ import annotations

import asyncio
import logging
import os

import grpc
from llmesh.tools.v1 import tools_pb2_grpc

from services.common.clients import service_identity
from services.tools import metrics
from services.tools.adapters.cgroups import CgroupLimits
from services.tools.adapters.fs_tools import FileTools
from services.tools.adapters.http_fetch import HttpFetchTool
from services.tools.adapters.launcher import Launchers
from services.tools.adapters.mcp_servers import McpHub, load_mcp_config
from services.tools.adapters.policy_client import GrpcPolicyClient
from services.tools.adapters.sandbox import Sandbox, SandboxLimits, detect_mode
from services.tools.adapters.shell_tool import ShellTool
from services.tools.adapters.uid_pool import SessionUidPool
from services.tools.config import Settings
from services.tools.core.cache import ResultCache
from services.tools.core.executor import ExecutorLimits, ToolExecutor
from services.tools.core.ports import AllowAllPolicy, PolicyPort
from services.tools.core.registry import ToolRegistry
from services.tools.core.workspace import WorkspaceRoots
from services.tools.servicer import ToolServicer

SERVICE_NAME = "llmesh.tools.v1.ToolService"
MB = 1024 * 1024

log = logging.getLogger("llmesh.tools")


class App:
    service_names = (SERVICE_NAME,)

    def __init__(self, settings: Settings, policy: PolicyPort | None = None) -> None:
        self.settings = s = settings
        # Root hands each new workspace to a uid of its session's own (or, with
        # no pool, to the one unprivileged user the sandbox runs commands as).
        drop = os.geteuid() == 0 and s.sandbox_uid >= 0
        self.owner = (s.sandbox_uid, s.sandbox_gid) if drop else (None, None)
        uid_pool = SessionUidPool(s.workspace_path, s.sandbox_uid_base, s.sandbox_uid_count) \
            if drop and s.sandbox_uid_count > 0 else None
        self.registry = ToolRegistry()
        self.file_tools = FileTools(s.max_read_bytes, *self.owner,
                                    max_concurrent_per_session=s.fs_max_concurrent_per_session,
                                    workspace_quota_bytes=s.workspace_quota_mb * MB)
        for spec in self.file_tools.specs():
            self.registry.add(spec)
        if s.http_fetch_enabled:
            self.registry.add(HttpFetchTool(s.http_fetch_max_bytes, 30_000).spec())
        self.policy_client = GrpcPolicyClient(s.policy_target, s.policy_timeout_s,
                                              service_identity(s, "tools")) if s.policy_target else None
        if policy is None and self.policy_client is None:
            log.warning("policy_target is empty: tool calls are NOT checked by policy (development only)")
        self.executor = ToolExecutor(
            self.registry, policy or self.policy_client or AllowAllPolicy(),
            WorkspaceRoots(s.workspace_path, *self.owner, allocate_owner=uid_pool.allocate if uid_pool else None),
            ResultCache(s.cache_ttl_s, s.cache_max_entries),
            ExecutorLimits(
                max_concurrent_calls=s.max_concurrent_calls,
                max_concurrent_calls_per_session=s.max_concurrent_calls_per_session,
                max_batch_calls=s.max_batch_calls, output_cap_bytes=s.output_cap_bytes,
                max_timeout_ms=s.max_timeout_ms, retry_max_attempts=s.retry_max_attempts,
                retry_base_delay_ms=s.retry_base_ms, retry_max_delay_ms=s.retry_max_ms,
                breaker_failure_threshold=s.breaker_failures, breaker_window_s=s.breaker_window_s,
                breaker_reset_s=s.breaker_reset_s))
        metrics.watch_executor(self.executor)
        self.mcp = McpHub(load_mcp_config(s.mcp_config), self.registry, s.mcp_refresh_s)
        self.sandbox: Sandbox | None = None
        self.cgroups: CgroupLimits | None = None

    def register(self, server: grpc.aio.Server) -> None:
        tools_pb2_grpc.add_ToolServiceServicer_to_server(ToolServicer(self.executor), server)

    async def start(self) -> None:
        s = self.settings
        s.workspace_path.mkdir(parents=True, exist_ok=True)
        # Resolved once, before any call: the launcher chain never looks programs up again.
        launchers = await asyncio.to_thread(Launchers.resolve)
        mode = await asyncio.to_thread(detect_mode, s.sandbox, launchers)
        if s.sandbox_cgroups:
            self.cgroups = await asyncio.to_thread(CgroupLimits.detect)
        limits = SandboxLimits(cpu_seconds=s.sandbox_cpu_s, address_space_bytes=s.sandbox_memory_mb * MB,
                               file_size_bytes=s.sandbox_file_size_mb * MB, open_files=s.sandbox_open_files,
                               processes=s.sandbox_max_processes, tmp_bytes=s.sandbox_tmp_mb * MB)
        self.sandbox = Sandbox(mode, limits, s.sandbox_uid, s.sandbox_gid, launchers=launchers, cgroups=self.cgroups)
        self.registry.add(ShellTool(self.sandbox, s.shell_timeout_ms, s.workspace_quota_mb * MB).spec())
        log.info("sandbox ready", extra={"event": "sandbox", "mode": mode,
                                         "cgroups": self.cgroups.kind if self.cgroups else "none"})
        await self.mcp.start()

    async def close(self) -> None:
        # File tool threads are daemons and are not waited for: one stuck in the
        # kernel must not keep a stopping service alive.
        self.file_tools.close()
        await self.mcp.close()
        if self.cgroups is not None:
            self.cgroups.close()
        if self.policy_client is not None:
            await self.policy_client.close()


def build_app(settings: Settings) -> App:
    return App(settings)
