"""Choosing a node: filter, affinity, then power of two choices on cost.

Cost estimates how long a new request would wait for its first token on a
node: its latency (EWMA of TTFT plus weighted inter-token latency) times the
requests ahead of it plus one, inflated by KV use. Two random candidates are
compared and the cheaper wins, which keeps load spread (unlike always taking
the global minimum, which herds every client onto the same node between
load polls) while starving slow or busy nodes.
"""
from __future__ import annotations

import hashlib
import random
import statistics
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from services.inference.client.core.node_state import NodeState


@dataclass(frozen=True)
class PickerConfig:
    strategy: str = "p2c"
    initial_ttft_ms: float = 50.0
    itl_weight: float = 4.0
    kv_weight: float = 1.0
    affinity_max_queue_depth: int = 4
    affinity_max_kv_usage: float = 0.95
    affinity_latency_ratio: float = 4.0
    prefix_affinity_chars: int = 256
    affinity_table_size: int = 100_000


def estimated_queue(node: NodeState) -> int:
    """Requests waiting for a sequence; our in-flight count sees them before the next load poll."""
    queued = node.load.queue_depth
    if node.load.num_sequences:
        queued = max(queued, node.outstanding - node.load.num_sequences)
    return queued


class NoNodeAvailable(Exception):
    """No healthy, non-ejected node is left to try."""


@dataclass(frozen=True)
class Typical:
    """What a node without samples is assumed to measure: its peers' medians."""

    ttft_ms: float
    itl_ms: float


@dataclass(frozen=True)
class Pick:
    node: NodeState
    # Why this node: "affinity", "p2c", "only", "round_robin".
    reason: str


class Picker:
    def __init__(self, config: PickerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._rr_counter = 0

    # -- affinity ---------------------------------------------------------
    def affinity_key(self, session_id: str | None, prompt: str = "") -> str | None:
        if session_id:
            return "session:" + session_id
        width = self.config.prefix_affinity_chars
        if width and len(prompt) >= width:
            return "prefix:" + hashlib.blake2b(prompt[:width].encode(), digest_size=12).hexdigest()
        return None

    def holder_of(self, key: str) -> str | None:
        return self._affinity.get(key)

    def remember(self, key: str | None, address: str) -> None:
        if key is None:
            return
        self._affinity[key] = address
        self._affinity.move_to_end(key)
        while len(self._affinity) > self.config.affinity_table_size:
            self._affinity.popitem(last=False)

    def forget(self, key: str) -> None:
        self._affinity.pop(key, None)

    # -- scoring ----------------------------------------------------------
    def latency_ms(self, node: NodeState, fallback: Typical) -> float:
        ttft = node.ttft_ms.value if node.ttft_ms.value is not None else fallback.ttft_ms
        itl = node.itl_ms.value if node.itl_ms.value is not None else fallback.itl_ms
        return ttft + self.config.itl_weight * itl

    def cost(self, node: NodeState, fallback: Typical) -> float:
        kv = min(max(node.load.kv_usage, 0.0), 1.0)
        return self.latency_ms(node, fallback) * (1 + node.outstanding) * (1 + self.config.kv_weight * kv)

    def _fallback(self, nodes: Collection[NodeState]) -> Typical:
        # A node without samples is assumed typical, in TTFT and in ITL alike:
        # neither starved nor flooded, and never "slower" than a measured peer
        # only because one of its two figures is still missing.
        ttfts = [n.ttft_ms.value for n in nodes if n.ttft_ms.value is not None]
        itls = [n.itl_ms.value for n in nodes if n.itl_ms.value is not None]
        return Typical(statistics.median(ttfts) if ttfts else self.config.initial_ttft_ms,
                       statistics.median(itls) if itls else 0.0)

    # -- choosing ---------------------------------------------------------
    def candidates(self, nodes: Mapping[str, NodeState], now: float, exclude: Collection[str] = (),
                   model: str = "") -> list[NodeState]:
        return [n for addr, n in sorted(nodes.items())
                if addr not in exclude and n.is_available(now) and n.serves(model)]

    def choose(self, nodes: Mapping[str, NodeState], now: float, key: str | None = None,
               exclude: Collection[str] = (), model: str = "") -> Pick:
        """Pick a node serving ``model`` for a request with affinity ``key``; records the choice for ``key``."""
        pool = self.candidates(nodes, now, exclude, model)
        if not pool:
            raise NoNodeAvailable("no healthy inference node is available"
                                  + (f" for model {model!r}" if model else ""))
        if self.config.strategy == "round_robin":
            node = pool[self._rr_counter % len(pool)]
            self._rr_counter += 1
            return Pick(node, "round_robin")
        fallback = self._fallback(nodes.values())
        pick = self._sticky(pool, key, fallback) or self._two_choices(pool, fallback)
        self.remember(key, pick.node.address)
        return pick

    def _sticky(self, pool: list[NodeState], key: str | None, fallback: Typical) -> Pick | None:
        holder_address = self.holder_of(key) if key else None
        holder = next((n for n in pool if n.address == holder_address), None)
        if holder is None or self.is_overloaded(holder, pool, fallback):
            return None
        return Pick(holder, "affinity")

    def is_overloaded(self, holder: NodeState, pool: list[NodeState], fallback: Typical) -> bool:
        """Whether a session should leave ``holder`` despite its KV cache there."""
        cfg = self.config
        # Waiting for a free sequence is what overload means on a node; moving
        # pays a full prefill elsewhere, so it is worth it only where the queue
        # is clearly shorter (under uniform overload every session stays).
        others = [n for n in pool if n is not holder]
        if not others:
            return False  # nowhere better to go: keep the KV cache
        shortest_other = min((estimated_queue(n) for n in others), default=None)
        if shortest_other is not None and (
                estimated_queue(holder) - shortest_other >= cfg.affinity_max_queue_depth):
            return True
        if holder.load.kv_usage >= cfg.affinity_max_kv_usage:
            return True
        # Load was judged above; here only a node that decodes far slower than
        # its peers (throttling, a noisy neighbour) loses its sessions. The
        # inter-token EWMA measures speed alone; TTFT also carries queueing
        # and prompt length, so it is the yardstick only without ITL samples.
        holder_itl = holder.itl_ms.value
        other_itls = [itl for n in others if (itl := n.itl_ms.value) is not None]
        if holder_itl is not None and len(other_itls) == len(others):
            fastest = min(other_itls)
            return bool(others) and holder_itl > cfg.affinity_latency_ratio * fastest
        latencies = [self.latency_ms(n, fallback) for n in others]
        return bool(latencies) and self.latency_ms(holder, fallback) > cfg.affinity_latency_ratio * min(latencies)

    def _two_choices(self, pool: list[NodeState], fallback: Typical) -> Pick:
        if len(pool) == 1:
            return Pick(pool[0], "only")
        first, second = self.rng.sample(pool, 2)
        first_cost, second_cost = self.cost(first, fallback), self.cost(second, fallback)
        return Pick(first if first_cost <= second_cost else second, "p2c")
