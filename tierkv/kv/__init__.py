"""KV cache: the interface the model talks to (interface.py), the rule that picks a cache (factory.py), the caches
(caches/), where bytes live (storage/), which tier holds each chunk (placement/) and sparse decode's parts (sparse/).
"""

from tierkv.kernels.causal_attention import causal_attention
from tierkv.kv.caches.base import KVCache
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions

__all__ = ["KVCache", "DenseKVCache", "causal_attention", "TieredKVCache", "TieredOptions"]
