"""Request economics shared by the mesh: canonical request hashing and response caching."""
from services.common.economics.response_cache import CacheStats, ResponseCache, canonical_request_hash

__all__ = ["CacheStats", "ResponseCache", "canonical_request_hash"]
