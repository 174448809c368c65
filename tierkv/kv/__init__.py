"""KV cache: the interface the model talks to, the all-on-device cache, and the tiered store."""

from tierkv.kv.caches.dense import DenseKVCache, KVCache, causal_attention
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions

__all__ = ["KVCache", "DenseKVCache", "causal_attention", "TieredKVCache", "TieredOptions"]
