"""Settings of the exec-policy and audit service."""
from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import ServerSettings

DEFAULT_PORT = 50054


@dataclass(frozen=True)
class Settings(ServerSettings):
    # gRPC port.
    port: int = DEFAULT_PORT
    # Rule file to use instead of the bundled default_policy.yaml; watched and
    # hot-reloaded. Empty uses the bundled file.
    policy_file: str = ""
    # Seconds between checks of the policy file for changes.
    reload_interval_s: float = 2.0
    # "store" keeps the audit chain and the approvals in the store service,
    # shared by every replica and kept across restarts; "memory" keeps both in
    # this process only (tests, demos).
    audit_backend: str = "store"
    # host:port of the store service (with audit_backend "store").
    store_target: str = "127.0.0.1:50055"
    # Environment variable holding the audit HMAC key (hex or text, >= 16 bytes).
    audit_key_env: str = "LLMESH_AUDIT_KEY"
    # Key file used when that variable is unset; relative to data_dir; created
    # with mode 0600 on first start.
    audit_key_file: str = "policy-audit.key"
    # Unanswered approval requests expire after this many seconds.
    approval_ttl_s: float = 3600.0
    # With audit_backend "memory": approvals kept in this process (the oldest are
    # dropped first).
    max_pending_approvals: int = 100_000
    # With audit_backend "store": session-wide grants this replica caches (the
    # least recently used are dropped first); a call no cached grant covers is
    # checked with the store.
    approval_cache_grants: int = 100_000
    # Threads that judge calls off the event loop; one tenant may use all but one (at least 2).
    evaluate_workers: int = 4
    # Seconds of judging per call; past them the commands not yet judged are left to a person (prompt).
    evaluate_budget_s: float = 0.25
    # Seconds after which a judgement still running fails the call with DEADLINE_EXCEEDED.
    evaluate_timeout_s: float = 5.0
