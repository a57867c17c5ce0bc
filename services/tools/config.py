"""Settings of the tool executor (env LLMESH_TOOLS_<FIELD>, CLI --field-name)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.common.settings import ServerSettings

DEFAULT_PORT = 50053


@dataclass(frozen=True)
class Settings(ServerSettings):
    # gRPC port.
    port: int = DEFAULT_PORT
    # Sessions work in <workspace_root>/<tenant_id>/<session_id>; empty = <data_dir>/workspaces.
    # Replicas share it: one directory on one machine, a ReadWriteMany volume (with
    # flock support) on Kubernetes, so any replica serves any session.
    workspace_root: str = ""
    # host:port of the policy service. Empty turns policy checks OFF: development only.
    policy_target: str = ""
    policy_timeout_s: float = 2.0
    # auto | bwrap | unshare | none (auto picks the strongest that works here).
    sandbox: str = "auto"
    # Run as root, each session's commands run as a uid (and gid) of its own from
    # sandbox_uid_base .. +sandbox_uid_count-1; with a count of 0, all run as
    # sandbox_uid/sandbox_gid, and -1 there keeps the service's own.
    sandbox_uid: int = 65534
    sandbox_gid: int = 65534
    sandbox_uid_base: int = 200_000
    sandbox_uid_count: int = 1_000_000
    # A memory (sandbox_memory_mb) and pids (sandbox_max_processes) cgroup per call, where one can be made.
    sandbox_cgroups: bool = True
    # Size of the private /tmp each bubblewrap sandbox gets.
    sandbox_tmp_mb: int = 64
    # What a session's workspace may hold; past it, commands cannot grow any file.
    workspace_quota_mb: int = 1024
    # rlimits of every sandboxed process: CPU seconds, address space (also the
    # memory cap of a call's cgroup), file size, open files, processes (also the
    # pids cap of a call's cgroup).
    sandbox_cpu_s: int = 30
    sandbox_memory_mb: int = 2048
    sandbox_file_size_mb: int = 256
    sandbox_open_files: int = 256
    sandbox_max_processes: int = 64
    # Default timeout of shell_exec (a call may ask for less, or more up to max_timeout_ms).
    shell_timeout_ms: int = 30_000
    # The http_fetch tool (off by default), and the most bytes it returns.
    http_fetch_enabled: bool = False
    http_fetch_max_bytes: int = 4 * 1024 * 1024
    # Byte cap of each captured stream (stdout, stderr, content): head + tail past it.
    output_cap_bytes: int = 64 * 1024
    # fs_read without a limit reads at most this many bytes.
    max_read_bytes: int = 16 * 1024 * 1024
    # Calls running at once in the service, and per session.
    max_concurrent_calls: int = 16
    max_concurrent_calls_per_session: int = 8
    # fs_* calls of one session running at once (each on a thread of its own); more wait for
    # a slot within their timeout, or are RESOURCE_EXHAUSTED while timed-out ones still run.
    fs_max_concurrent_per_session: int = 4
    # Calls in one ExecuteTools batch.
    max_batch_calls: int = 64
    # The longest timeout a call may ask for.
    max_timeout_ms: int = 600_000
    # Result cache of idempotent tools: entry lifetime and size.
    cache_ttl_s: float = 300.0
    cache_max_entries: int = 1024
    # Circuit breaker per tool: failures within the window that open it, and how long it stays open.
    breaker_failures: int = 5
    breaker_window_s: float = 60.0
    breaker_reset_s: float = 30.0
    # Retries of retryable tools: attempts, exponential backoff base and cap.
    retry_max_attempts: int = 3
    retry_base_ms: float = 100.0
    retry_max_ms: float = 2_000.0
    # JSON file naming the MCP servers to start over stdio; empty = none.
    mcp_config: str = ""
    mcp_refresh_s: float = 300.0

    @property
    def workspace_path(self) -> Path:
        return Path(self.workspace_root) if self.workspace_root else self.data_path / "workspaces"
