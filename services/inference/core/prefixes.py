"""Prefix hashes: how a node indexes the token prefixes it holds, and how it tells routers about them.

Two chains of block hashes, both seeded with the tenant, so one tenant's
prefix never matches another's (a shared cell would reveal, by its speed or
its ``cached_tokens``, what another tenant sent):

- **Token blocks** (``TokenBlockIndex``): the engine hashes every full block of
  ``block_tokens`` token ids of each sequence. Hash ``i`` covers blocks
  ``0..i``, so equal hashes mean equal prefixes (up to a collision, which the
  engine rules out by comparing the tokens). A new sequence finds the
  resident sequence holding its longest prefix by walking its own chain.
- **Text blocks** (``text_prefix_hashes``): a router sees prompt text, not
  tokens. A node reports the chain hashes of the leading ``block_chars``-wide
  blocks of the prompts whose cells it holds (GetLoad's prefix summary); the
  router hashes a request's text the same way and sends it where the deepest
  hash matches.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

#: Characters per text block of the routing summary, and leading blocks hashed per prompt.
DEFAULT_BLOCK_CHARS = 256
DEFAULT_MAX_BLOCKS = 16


def text_prefix_hashes(tenant_id: str, text: str, block_chars: int = DEFAULT_BLOCK_CHARS,
                       max_blocks: int = DEFAULT_MAX_BLOCKS) -> list[int]:
    """Chain hashes (64-bit) of the leading full ``block_chars`` blocks of ``text``, at most ``max_blocks``.

    Stable across processes and machines: nodes and routers compute them apart.
    """
    if block_chars <= 0:
        return []
    digest = hashlib.blake2b(tenant_id.encode(), digest_size=8, person=b"llmesh-prefix").digest()
    hashes = []
    for i in range(min(len(text) // block_chars, max_blocks)):
        block = text[i * block_chars:(i + 1) * block_chars].encode("utf-8", "surrogatepass")
        digest = hashlib.blake2b(digest + block, digest_size=8).digest()
        hashes.append(int.from_bytes(digest, "big"))
    return hashes


def deepest_match(request_hashes: Sequence[int], held: Iterable[int] | frozenset[int] | set[int]) -> int:
    """How many leading blocks of a request a holder has (0: none)."""
    held_set = held if isinstance(held, (set, frozenset)) else set(held)
    for depth in range(len(request_hashes), 0, -1):
        if request_hashes[depth - 1] in held_set:
            return depth
    return 0


def summarize(chains: Iterable[Sequence[int]], limit: int) -> list[int]:
    """At most ``limit`` distinct hashes of ``chains``, shallow blocks first (they match the most requests)."""
    chains = [list(c) for c in chains]
    seen: dict[int, None] = {}
    depth = 0
    while len(seen) < limit and any(depth < len(c) for c in chains):
        for chain in chains:
            if depth < len(chain):
                seen.setdefault(chain[depth])
                if len(seen) >= limit:
                    break
        depth += 1
    return list(seen)


def _token_block_hash(previous: int, block: Sequence[int]) -> int:
    return hash((previous, tuple(block)))


class TokenBlockIndex:
    """Block hash -> the sequences whose cells hold that prefix, kept in step with each sequence's tokens."""

    def __init__(self, block_tokens: int) -> None:
        self.block_tokens = block_tokens
        self._holders: dict[int, set[int]] = {}
        self._chains: dict[int, list[int]] = {}

    def seed(self, tenant_id: str) -> int:
        return hash(("llmesh-prefix", tenant_id))

    def chain(self, tenant_id: str, tokens: Sequence[int], start: list[int] | None = None) -> list[int]:
        """Chain hashes of every full block of ``tokens``; ``start`` holds already known leading hashes."""
        size = self.block_tokens
        hashes = list(start or [])
        previous = hashes[-1] if hashes else self.seed(tenant_id)
        for i in range(len(hashes), len(tokens) // size if size else 0):
            previous = _token_block_hash(previous, tokens[i * size:(i + 1) * size])
            hashes.append(previous)
        return hashes

    def update(self, seq_id: int, tenant_id: str, tokens: Sequence[int], unchanged: int | None = None) -> None:
        """Re-index ``seq_id`` after its tokens changed; its first ``unchanged`` tokens are known to be the same
        (None: all it had indexed)."""
        if not self.block_tokens:
            return
        old = self._chains.get(seq_id, [])
        keep = len(old) if unchanged is None else min(unchanged // self.block_tokens, len(old))
        for h in old[keep:]:
            self._drop(h, seq_id)
        new = self.chain(tenant_id, tokens, old[:keep])
        for h in new[keep:]:
            self._holders.setdefault(h, set()).add(seq_id)
        if new:
            self._chains[seq_id] = new
        else:
            self._chains.pop(seq_id, None)

    def _drop(self, h: int, seq_id: int) -> None:
        holders = self._holders.get(h)
        if holders is not None:
            holders.discard(seq_id)
            if not holders:
                del self._holders[h]

    def holders(self, tenant_id: str, tokens: Sequence[int]) -> tuple[int, set[int]]:
        """(blocks matched, the sequences holding that many leading blocks of ``tokens``)."""
        size = self.block_tokens
        previous = self.seed(tenant_id)
        found: set[int] = set()
        depth = 0
        for i in range(len(tokens) // size if size else 0):
            previous = _token_block_hash(previous, tokens[i * size:(i + 1) * size])
            holders = self._holders.get(previous)
            if not holders:
                break
            found, depth = set(holders), i + 1
        return depth, found
