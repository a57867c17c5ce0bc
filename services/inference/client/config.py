"""Settings of the client-side inference balancer.

They are read with the inference service's prefix, so the same environment
that tells a launcher where the nodes are tells every client:
``LLMESH_INFERENCE_NODES=127.0.0.1:50051,127.0.0.1:50062`` or, on a cluster,
``LLMESH_INFERENCE_NODES=dns:inference-nodes.llmesh.svc.cluster.local:50051``.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from services.common.errors import require
from services.common.settings import load_settings
from services.common.tenants import parse_tenant_policies
from services.inference.client.cascade import parse_cascades
from services.inference.client.routing import parse_fallbacks, parse_model_profiles, parse_tier_thresholds

INFERENCE_SERVICE = "llmesh.inference.v1.InferenceService"
STRATEGIES = ("p2c", "round_robin")


@dataclass(frozen=True)
class BalancerSettings:
    # host:port entries; an entry "dns:host:port" is resolved (every address
    # becomes a node) and re-resolved every dns_refresh_s.
    nodes: tuple[str, ...] = ()
    # Health service name watched on each node (the readiness name).
    health_service: str = INFERENCE_SERVICE
    # Delay before re-opening a broken health Watch; a node whose stream broke
    # is unhealthy meanwhile, so this bounds how long a revived node waits.
    health_interval_s: float = 1.0
    # How often GetLoad is polled per node.
    load_interval_s: float = 0.5
    # How often dns: entries are resolved again.
    dns_refresh_s: float = 10.0
    # "p2c" (scored power of two choices with affinity) or "round_robin".
    strategy: str = "p2c"
    # Weight of the newest sample in the TTFT / inter-token EWMAs.
    ewma_alpha: float = 0.3
    # Latency assumed for a node before its first sample.
    initial_ttft_ms: float = 50.0
    # How much a full KV cache inflates a node's cost (cost * (1 + w * kv)).
    kv_weight: float = 1.0
    # How many ms one inter-token ms is worth in the latency estimate.
    itl_weight: float = 4.0
    # A session leaves its node when that node has this many more requests
    # waiting for a sequence than the least queued node, this much KV in
    # use, or a latency EWMA above ratio x the fastest other node's.
    affinity_max_queue_depth: int = 4
    affinity_max_kv_usage: float = 0.95
    affinity_latency_ratio: float = 4.0
    # Prefix-aware routing: a request without a session holder goes to the
    # node holding the longest leading text of its prompt (its prefix cache).
    # This is the text block width assumed until a node reports its own;
    # 0 disables prefix routing.
    prefix_affinity_chars: int = 256
    # Prefix hashes remembered per node as sent there by this client (least
    # recently sent go first), and for how long each counts as held there
    # before the node's own GetLoad summary has to confirm it.
    prefix_routed_max: int = 1024
    prefix_routed_ttl_s: float = 5.0
    # Sessions remembered for KV affinity (least recently used go first).
    affinity_table_size: int = 100_000
    # Consecutive failures that eject a node, and the ejection time, which
    # doubles per repeated ejection up to ejection_max_s.
    eject_after_failures: int = 3
    # An ejected node stays out for base * 2^(ejections-1) seconds, at most max.
    ejection_base_s: float = 2.0
    ejection_max_s: float = 60.0
    # Attempts per request (the first plus retries on other nodes); retries
    # happen only before the first token.
    max_attempts: int = 3
    # start() waits this long for the first health answer of every node.
    start_timeout_s: float = 5.0
    # Models each node serves are re-listed every this many load polls.
    models_refresh_polls: int = 20
    # Routing (docs/economics.md). Profiles of the served model names as JSON:
    # {"name": {"tier": 1, "cost_per_1k_tokens": 2.0, "ms_per_token": 30,
    #  "capabilities": ["chat", "grammar"]}}; a name without one gets the defaults.
    model_profiles: str = ""
    # Fallback chains as JSON, {"model": ["next", ...]}: when a model's nodes
    # are unavailable (or give no first token within fallback_after_s) the
    # request moves on to the next name. "auto" requests use the router's chain.
    model_fallbacks: str = ""
    # Seconds a model may take to stream its first token before a request
    # with a fallback moves on; 0 waits for the node's own answer or deadline.
    fallback_after_s: float = 0.0
    # Cascades as JSON: a model name answered by "small" and escalated to
    # "large" when the small answer fails its check, e.g. {"gemma-cascade":
    # {"small": "gemma-fast", "large": "gemma-3-270m", "min_mean_logprob": -1.0,
    #  "min_chars": 1, "max_chars": 0}}.
    model_cascades: str = ""
    # Per-tenant settings, the same JSON the nodes read (LLMESH_INFERENCE_TENANT_POLICIES);
    # the balancer applies route_max_cost to a tenant's "auto" requests.
    tenant_policies: str = ""
    # Thresholds of the complexity estimate that need each tier, as JSON
    # {"1": 0.5}: prompts at 0.5 or above want a tier-1 model.
    route_tier_thresholds: str = '{"1": 0.5}'

    def __post_init__(self) -> None:
        require(self.strategy in STRATEGIES, "strategy", f"must be one of {', '.join(STRATEGIES)}")
        require(0.0 < self.ewma_alpha <= 1.0, "ewma_alpha", "must be in (0, 1]")
        require(self.health_interval_s > 0, "health_interval_s", "must be > 0")
        require(self.load_interval_s > 0, "load_interval_s", "must be > 0")
        require(self.dns_refresh_s > 0, "dns_refresh_s", "must be > 0")
        require(self.eject_after_failures >= 1, "eject_after_failures", "must be >= 1")
        require(0 < self.ejection_base_s <= self.ejection_max_s, "ejection_base_s",
                "must be > 0 and <= ejection_max_s")
        require(self.max_attempts >= 1, "max_attempts", "must be >= 1")
        require(self.models_refresh_polls >= 1, "models_refresh_polls", "must be >= 1")
        require(self.fallback_after_s >= 0, "fallback_after_s", "must be >= 0")
        require(self.affinity_latency_ratio >= 1.0, "affinity_latency_ratio", "must be >= 1")
        require(self.affinity_table_size >= 1, "affinity_table_size", "must be >= 1")
        require(self.prefix_affinity_chars >= 0, "prefix_affinity_chars", "must be >= 0")
        require(self.prefix_routed_max >= 1, "prefix_routed_max", "must be >= 1")
        require(self.prefix_routed_ttl_s >= 0, "prefix_routed_ttl_s", "must be >= 0")
        for entry in self.nodes:
            require(_valid_entry(entry), "nodes", f"{entry!r} is not host:port or dns:host:port")
        # Refused here, naming the setting, rather than on the first request.
        parse_model_profiles(self.model_profiles)
        parse_fallbacks(self.model_fallbacks)
        parse_tier_thresholds(self.route_tier_thresholds)
        parse_cascades(self.model_cascades)
        parse_tenant_policies(self.tenant_policies)


def _valid_entry(entry: str) -> bool:
    target = entry[len("dns:"):] if entry.startswith("dns:") else entry
    host, sep, port = target.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def load_balancer_settings(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> BalancerSettings:
    """Settings from ``LLMESH_INFERENCE_*`` (then ``LLMESH_*``) and flags."""
    return load_settings(BalancerSettings, "inference", argv or [], environ)
