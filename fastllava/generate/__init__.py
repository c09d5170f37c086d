"""Generation: batched KV-cache decoding over a packed prefill (engine.py), sampling rules (sampling.py),
the cache (kv_cache.py)."""

from .kv_cache import CacheStep, KVCache
from .engine import Event, GenerationStats, Generator

__all__ = ["CacheStep", "Event", "GenerationStats", "Generator", "KVCache"]
