"""The exact response cache: canonical hashing, TTL, LRU bound, hit rate."""
from __future__ import annotations

import pytest

from services.inference.core.response_cache import ResponseCache, canonical_request_hash


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_hash_ignores_field_order_but_not_values():
    a = canonical_request_hash({"prompt": "hi", "temperature": 0.0, "stop": ["x"]})
    b = canonical_request_hash({"stop": ("x",), "temperature": 0.0, "prompt": "hi"})
    assert a == b
    assert a != canonical_request_hash({"prompt": "hi", "temperature": 0.5, "stop": ["x"]})
    assert a != canonical_request_hash({"prompt": "hi ", "temperature": 0.0, "stop": ["x"]})


def test_hit_returns_stored_value_and_counts_hit_rate():
    cache: ResponseCache[str] = ResponseCache(max_entries=4, ttl_s=10)
    assert cache.get("k") is None
    cache.put("k", "answer")
    assert cache.get("k") == "answer"
    assert cache.get("k") == "answer"
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.entries) == (2, 1, 1)
    assert stats.hit_rate == pytest.approx(2 / 3)


def test_entry_expires_after_ttl():
    clock = FakeClock()
    cache: ResponseCache[str] = ResponseCache(max_entries=4, ttl_s=5, clock=clock)
    cache.put("k", "v")
    clock.now += 4.9
    assert cache.get("k") == "v"
    clock.now += 0.2
    assert cache.get("k") is None
    assert len(cache) == 0 and cache.stats().expirations == 1


def test_least_recently_used_entry_is_evicted_first():
    cache: ResponseCache[int] = ResponseCache(max_entries=2, ttl_s=60)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") is None
    assert cache.get("a") == 1 and cache.get("c") == 3
    assert cache.stats().evictions == 1


def test_zero_entries_disables_the_cache():
    cache: ResponseCache[int] = ResponseCache(max_entries=0, ttl_s=60)
    cache.put("a", 1)
    assert cache.get("a") is None and not cache.enabled


@pytest.mark.parametrize("kwargs", [dict(max_entries=-1, ttl_s=1), dict(max_entries=1, ttl_s=0)])
def test_bad_bounds_are_refused(kwargs):
    with pytest.raises(ValueError):
        ResponseCache(**kwargs)
