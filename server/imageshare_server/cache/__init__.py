"""The in-process cache of complete share lists (TTL, stale windows, measured LRU bounds)."""

from imageshare_server.cache._cache import (
    MAX_MESSAGE_VARIANTS,
    CacheEntry,
    CachePolicy,
    Freshness,
    ShareCache,
)

__all__ = ["MAX_MESSAGE_VARIANTS", "CacheEntry", "CachePolicy", "Freshness", "ShareCache"]
