"""Choosing a node: filter, session affinity, prefix, then power of two choices on cost.

Cost estimates how long a new request would wait for its first token on a
node: its latency (EWMA of TTFT plus weighted inter-token latency) times the
requests ahead of it plus one, inflated by KV use. Two random candidates are
compared and the cheaper wins, which keeps load spread (unlike always taking
the global minimum, which herds every client onto the same node between
load polls) while starving slow or busy nodes.

Before that, a request whose text starts like a prompt some node holds KV
cells for goes to that node: it prefills only the rest, which cuts its time
to first token by the shared part's prefill.
"""
from __future__ import annotations

import random
import statistics
from collections import OrderedDict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from services.inference.client.core.node_state import NodeState
from services.inference.core.prefixes import DEFAULT_BLOCK_CHARS, DEFAULT_MAX_BLOCKS, text_prefix_hashes


@dataclass(frozen=True)
class PickerConfig:
    strategy: str = "p2c"
    initial_ttft_ms: float = 50.0
    itl_weight: float = 4.0
    kv_weight: float = 1.0
    affinity_max_queue_depth: int = 4
    affinity_max_kv_usage: float = 0.95
    affinity_latency_ratio: float = 4.0
    # Text block width assumed for a node that has not reported one; 0 turns prefix routing off.
    prefix_affinity_chars: int = 256
    # Leading blocks hashed per request (the nodes summarize as many).
    prefix_max_blocks: int = DEFAULT_MAX_BLOCKS
    # Prefix hashes remembered per node as sent there, and for how long a poll may take to confirm them.
    prefix_routed_max: int = 1024
    prefix_routed_ttl_s: float = 5.0
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
    # Why this node: "affinity", "prefix", "p2c", "only", "round_robin".
    reason: str


@dataclass
class PrefixQuery:
    """A request's text as prefix routing sees it: its tenant's chain hashes, per block width.

    Nodes may report different widths, and a retry asks again, so each
    width is hashed once per request.
    """

    tenant_id: str
    text: str
    max_blocks: int = DEFAULT_MAX_BLOCKS
    _by_width: dict[int, list[int]] = field(default_factory=dict, repr=False)

    def hashes(self, block_chars: int) -> list[int]:
        found = self._by_width.get(block_chars)
        if found is None:
            found = text_prefix_hashes(self.tenant_id, self.text, block_chars, self.max_blocks)
            self._by_width[block_chars] = found
        return found


def prefix_key(tenant_id: str, prompt: str, block_chars: int = DEFAULT_BLOCK_CHARS) -> str:
    """The hex of the first text-block hash of ``prompt`` for ``tenant_id`` ("" under one block).

    For a proxy that balances by a consistent hash of a header (Envoy's
    ``prefix_header``): prompts that start alike get the same key.
    """
    hashes = text_prefix_hashes(tenant_id, prompt, block_chars, max_blocks=1)
    return f"{hashes[0]:016x}" if hashes else ""


class Picker:
    def __init__(self, config: PickerConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self._affinity: OrderedDict[str, str] = OrderedDict()
        self._rr_counter = 0

    # -- affinity ---------------------------------------------------------
    def affinity_key(self, session_id: str | None) -> str | None:
        return "session:" + session_id if session_id else None

    def prefix_query(self, tenant_id: str, prompt: str) -> PrefixQuery | None:
        """What prefix routing needs of a request; None with routing off or no text (token ids are not hashed)."""
        if not self.config.prefix_affinity_chars or not prompt:
            return None
        return PrefixQuery(tenant_id, prompt, self.config.prefix_max_blocks)

    def block_chars(self, node: NodeState) -> int:
        """The text block width ``node`` hashes prompts with: its own once reported, else the assumed one."""
        return node.prefix_block_chars or self.config.prefix_affinity_chars

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
               exclude: Collection[str] = (), model: str = "", prefix: PrefixQuery | None = None) -> Pick:
        """Pick a node serving ``model`` for a request with affinity ``key`` and text ``prefix``.

        Records the choice for ``key``, and the prefix as held there until the node's polls tell.
        """
        pool = self.candidates(nodes, now, exclude, model)
        if not pool:
            raise NoNodeAvailable("no healthy inference node is available"
                                  + (f" for model {model!r}" if model else ""))
        if self.config.strategy == "round_robin":
            node = pool[self._rr_counter % len(pool)]
            self._rr_counter += 1
            return Pick(node, "round_robin")
        fallback = self._fallback(nodes.values())
        pick = (self._sticky(pool, key, fallback) or self._by_prefix(pool, prefix, now, fallback)
                or self._two_choices(pool, fallback))
        self.remember(key, pick.node.address)
        if prefix is not None:
            pick.node.note_routed(prefix.hashes(self.block_chars(pick.node)), now, self.config.prefix_routed_max)
        return pick

    def _sticky(self, pool: list[NodeState], key: str | None, fallback: Typical) -> Pick | None:
        holder_address = self.holder_of(key) if key else None
        holder = next((n for n in pool if n.address == holder_address), None)
        if holder is None or self.is_overloaded(holder, pool, fallback):
            return None
        return Pick(holder, "affinity")

    def _by_prefix(self, pool: list[NodeState], prefix: PrefixQuery | None, now: float,
                   fallback: Typical) -> Pick | None:
        """The node holding the longest leading text of the request (cheapest among equals), unless overloaded."""
        if prefix is None:
            return None
        best: NodeState | None = None
        best_rank = (0, 0.0)
        for node in pool:
            width = self.block_chars(node)
            depth = node.prefix_depth(prefix.hashes(width), now, self.config.prefix_routed_ttl_s)
            # Nodes may hash with different widths: characters matched is what compares.
            rank = (-depth * width, self.cost(node, fallback))
            if depth and (best is None or rank < best_rank):
                best, best_rank = node, rank
        if best is None or self.is_overloaded(best, pool, fallback):
            return None
        return Pick(best, "prefix")

    def is_overloaded(self, holder: NodeState, pool: list[NodeState], fallback: Typical) -> bool:
        """Whether a request should leave ``holder`` despite its KV cache there (a session's or a prefix's)."""
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
        if self._kv_exhausted(holder, others):
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

    def _kv_exhausted(self, holder: NodeState, others: list[NodeState]) -> bool:
        """Whether ``holder``'s KV cache is full of work while another node has room.

        A node's KV use counts the cells it keeps for reuse (idle sessions,
        finished prompts) too, so a caching node runs full in steady state and
        frees them on demand; only with requests waiting there are the cells
        taken by running work.
        """
        limit = self.config.affinity_max_kv_usage
        return (holder.load.kv_usage >= limit and estimated_queue(holder) > 0
                and any(n.load.kv_usage < limit for n in others))

    def _two_choices(self, pool: list[NodeState], fallback: Typical) -> Pick:
        if len(pool) == 1:
            return Pick(pool[0], "only")
        first, second = self.rng.sample(pool, 2)
        first_cost, second_cost = self.cost(first, fallback), self.cost(second, fallback)
        return Pick(first if first_cost <= second_cost else second, "p2c")
