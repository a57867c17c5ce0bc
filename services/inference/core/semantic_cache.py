"""Semantic response cache: reuse an answer for a prompt that means nearly the same.

Opt-in per request, for single-turn prompts. Prompts are embedded by an
``Embedder`` (the inference node's own model, or the lexical
``HashingEmbedder``), and a lookup returns the stored answer of the most
similar prompt within the same scope (model and sampling settings) when the
cosine similarity reaches the threshold. Bounded by TTL and LRU like the
exact cache.
"""
from __future__ import annotations

import collections
import hashlib
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

V = TypeVar("V")


class Embedder(Protocol):
    #: True when ``embed`` runs the node's model (and so belongs on its engine thread).
    runs_model: bool

    def embed(self, text: str) -> Sequence[float] | npt.NDArray[np.float32]:
        """The embedding of ``text``: floats or a float32 vector (it goes through np.asarray)."""


class HashingEmbedder:
    """Lexical embedding: hashed word and character-trigram counts, L2-normalised.

    Needs no model: paraphrases that share most words score high, unrelated
    prompts low. Used with the synthetic backend and wherever a model-based
    embedder is not wanted.
    """

    runs_model = False

    def __init__(self, dim: int = 512) -> None:
        self.dim = dim

    def _bucket(self, feature: str) -> int:
        return int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=4).digest(), "little") % self.dim

    def embed(self, text: str) -> Sequence[float]:
        vector = [0.0] * self.dim
        words = re.findall(r"\w+", text.lower())
        for word in words:
            vector[self._bucket("w:" + word)] += 1.0
            padded = f" {word} "
            for i in range(len(padded) - 2):
                vector[self._bucket("c:" + padded[i:i + 3])] += 0.5
        return vector


@dataclass(frozen=True)
class SemanticHit(Generic[V]):
    value: V
    similarity: float


class SemanticCache(Generic[V]):
    def __init__(self, embedder: Embedder, threshold: float, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError("threshold must be within (0, 1]")
        if max_entries < 0 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 0 and ttl_s > 0")
        self.embedder = embedder
        self.threshold = threshold
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: collections.OrderedDict[int, tuple[str, float, np.ndarray, V]] = collections.OrderedDict()
        self._next_id = 0
        self.hits = self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0

    def vector(self, text: str) -> np.ndarray:
        """The normalised embedding of ``text`` (blocking: may run a model)."""
        vector = np.asarray(self.embedder.embed(text), dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 and math.isfinite(norm) else vector

    def lookup(self, scope: str, vector: np.ndarray) -> SemanticHit[V] | None:
        now = self._clock()
        best_id, best = None, -1.0
        for entry_id, (entry_scope, stored_at, stored, _) in list(self._entries.items()):
            if now - stored_at >= self.ttl_s:
                del self._entries[entry_id]
                continue
            if entry_scope != scope:
                continue
            similarity = float(np.dot(stored, vector))
            if similarity > best:
                best_id, best = entry_id, similarity
        if best_id is None or best < self.threshold:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(best_id)
        return SemanticHit(self._entries[best_id][3], best)

    def store(self, scope: str, vector: np.ndarray, value: V) -> None:
        if not self.enabled:
            return
        self._entries[self._next_id] = (scope, self._clock(), vector, value)
        self._next_id += 1
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
