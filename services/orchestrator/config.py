"""Settings of the agent orchestrator (env LLMESH_ORCHESTRATOR_<FIELD> or --field-name)."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50052


@dataclass(frozen=True)
class Settings(ServerSettings):
    # gRPC port.
    port: int = DEFAULT_PORT
    # host:port of one inference node (see inference_nodes for several).
    inference_target: str = ""
    # Comma-separated inference nodes (or dns:host:port): when set, calls go through the
    # shared client-side load balancer instead of inference_target alone.
    inference_nodes: str = ""
    # host:port of the tools service.
    tools_target: str = ""
    # host:port of the policy service.
    policy_target: str = ""
    # host:port of the store; empty keeps state in memory (one process only).
    store_target: str = ""
    # Role tool calls run as, checked by policy; empty = the policy's default role.
    tool_role: str = ""
    # Compaction starts when the next prompt would pass this fraction of n_ctx.
    context_fraction: float = 0.8
    # Defaults of a run: model calls per turn, and tokens per model call.
    default_max_steps: int = 8
    default_max_tokens: int = 256
    # Runs this replica drives at once; more are refused with RESOURCE_EXHAUSTED.
    max_active_runs: int = 64
    # Runs started per second per tenant and per model; 0 turns a limit off.
    tenant_runs_per_s: float = 0.0
    tenant_burst: float = 10.0
    # The same per model.
    model_runs_per_s: float = 0.0
    model_burst: float = 50.0
    # Event batching into the store.
    event_batch_ms: int = 20
    event_batch_max: int = 64
    # How long a run waits for an approval before it ends.
    approval_timeout_s: float = 600.0
    # Lease of the per-session run lock, renewed while the run goes on.
    session_lock_lease_ms: int = 30_000
    # Background agent tasks: workers on this replica, lease, idle re-check.
    max_workers: int = 2
    # Lease of a claimed task, how long an idle worker waits before looking again, and attempts before a task is dead.
    task_lease_ms: int = 30_000
    task_idle_wait_ms: int = 1000
    task_max_attempts: int = 3
    # Task classes (interactive / normal / batch, from the run's priority):
    # running tasks per class on this replica (0: only max_workers), workers
    # batch may never hold, and how long a class may go unclaimed behind
    # better ones before it is tried first (0: never).
    task_max_running_interactive: int = 0
    task_max_running_normal: int = 0
    task_max_running_batch: int = 0
    task_batch_reserved_workers: int = 1
    task_max_wait_ms_normal: int = 10_000
    task_max_wait_ms_batch: int = 30_000
    # Per-tenant economics settings as JSON (services/common/tenants.py);
    # here a tenant's max_priority caps the class of its tasks.
    tenant_policies: str = ""
    # Transient inference/tool/store failures.
    retry_attempts: int = 3
    retry_base_ms: int = 50
    # Name of this replica in task claims and locks; empty = a random one.
    replica_id: str = ""
    # Webhook delivery (docs/webhooks.md): concurrent senders on this replica
    # (0: this replica sends none; they run only with a store_target).
    webhook_workers: int = 4
    # Lease of a claimed delivery; longer than webhook_timeout_s, or a slow send is sent twice.
    webhook_lease_ms: int = 30_000
    # Sends to one destination (scheme://host:port) at once on this replica; a
    # destination at its cap is skipped by claims, so it never delays the others.
    webhook_max_per_destination: int = 2
    # Whole-request limit of one delivery POST.
    webhook_timeout_s: float = 5.0
    # Retry delay: equal-jitter exponential backoff from the base, capped at the
    # max; a longer Retry-After of the receiver wins (up to an hour).
    webhook_backoff_base_ms: int = 500
    webhook_backoff_max_ms: int = 60_000
    # How long an idle sender waits before claiming again.
    webhook_idle_wait_s: float = 0.2
    # Seconds between refreshes of the outbox gauges (pending, oldest age) from the store; 0: never.
    webhook_stats_interval_s: float = 5.0
    # Allow webhook URLs whose host resolves to private, loopback, link-local
    # or other non-public addresses (tests, private networks).
    webhook_allow_private: bool = False
