"""The semantic cache with the lexical embedder: near-duplicates hit, other prompts and scopes miss."""
from __future__ import annotations

import pytest

from services.inference.core.semantic_cache import HashingEmbedder, SemanticCache


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def make(threshold: float = 0.8, **kw) -> SemanticCache[str]:
    return SemanticCache(HashingEmbedder(), threshold=threshold, max_entries=kw.pop("max_entries", 8),
                         ttl_s=kw.pop("ttl_s", 60), **kw)


def test_paraphrase_hits_and_unrelated_prompt_misses():
    cache = make()
    cache.store("greedy", cache.vector("What is the capital of France?"), "Paris")
    hit = cache.lookup("greedy", cache.vector("what's the capital of France"))
    assert hit is not None and hit.value == "Paris" and hit.similarity >= 0.8
    assert cache.lookup("greedy", cache.vector("How do bees make honey?")) is None
    assert cache.hit_rate == 0.5


def test_scope_separates_sampling_settings():
    cache = make()
    cache.store("greedy", cache.vector("What is the capital of France?"), "Paris")
    assert cache.lookup("temperature=0.8", cache.vector("What is the capital of France?")) is None


def test_threshold_ttl_and_lru_bounds():
    clock = Clock()
    strict = make(threshold=0.999, clock=clock, ttl_s=5, max_entries=2)
    strict.store("s", strict.vector("What is the capital of France?"), "Paris")
    assert strict.lookup("s", strict.vector("what's the capital of France")) is None
    assert strict.lookup("s", strict.vector("What is the capital of France?")).value == "Paris"
    clock.now = 6
    assert strict.lookup("s", strict.vector("What is the capital of France?")) is None and len(strict) == 0
    for i, text in enumerate(["alpha beta", "gamma delta", "epsilon zeta"]):
        strict.store("s", strict.vector(text), str(i))
    assert len(strict) == 2 and strict.lookup("s", strict.vector("alpha beta")) is None


@pytest.mark.parametrize("kwargs", [dict(threshold=0), dict(threshold=1.5), dict(max_entries=-1), dict(ttl_s=0)])
def test_bad_bounds_are_refused(kwargs):
    with pytest.raises(ValueError):
        make(**kwargs)
