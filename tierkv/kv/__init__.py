"""KV cache: the interface the model talks to, the all-on-device cache, and the tiered store."""

from tierkv.kv.cache import DenseKVCache, KVCache, causal_attention

__all__ = ["KVCache", "DenseKVCache", "causal_attention"]
