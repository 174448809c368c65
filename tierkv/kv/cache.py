"""The KV cache interface the model calls (append, attend, advance) and the all-on-device cache.

Batch size is 1 throughout; tensors are (T, H, D). Keys arrive post-RoPE, with the pre-RoPE keys
beside them for caches that build low-rank shadows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int) -> torch.Tensor:
    """Attention of T queries at positions [q_offset, q_offset+T) over keys at [0, S); GQA by head groups.

    q (T, Hq, D), k/v (S, Hkv, D) -> (T, Hq, D). Does not mutate; computes in q's dtype.
    """
    t, s = q.shape[0], k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T|S, D)
    if t == 1:
        mask = None  # one query at the end sees every key
    else:
        qpos = torch.arange(q_offset, q_offset + t, device=q.device)
        mask = torch.arange(s, device=q.device)[None, :] <= qpos[:, None]  # (T, S)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=qh.shape[0] != kh.shape[0])
    return out.transpose(0, 1)  # (T, Hq, D)


class KVCache(ABC):
    """Per-sequence K/V for every layer.

    The model calls, for each forward of T new tokens: per layer `append` then `attend`; after the
    last layer `advance(T)`. Positions of the new tokens are [seq_len, seq_len + T).
    """

    seq_len: int = 0

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        """Store keys k (T, Hkv, D, post-RoPE), values v (T, Hkv, D) and pre-RoPE keys for layer. Mutates."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Causal attention of q (T, Hq, D), the tokens just appended, over everything stored -> (T, Hq, D)."""

    def advance(self, n: int) -> None:
        """Commit n tokens appended to every layer."""
        self.seq_len += n

    def close(self) -> None:
        """Release storage (files, pinned memory). Safe to call twice."""


class DenseKVCache(KVCache):
    """Every layer's K/V in preallocated tensors on one device; grows by doubling when full."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device: torch.device | str,
                 dtype: torch.dtype, capacity: int = 256) -> None:
        self.num_layers, self.seq_len = num_layers, 0
        shape = (num_layers, max(1, capacity), num_kv_heads, head_dim)  # (L, S, Hkv, D)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _grow(self, need: int) -> None:
        cap = self.capacity
        while cap < need:
            cap *= 2
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], cap, *old.shape[2:]))
            new[:, : self.seq_len] = old[:, : self.seq_len]
            setattr(self, name, new)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        end = self.seq_len + k.shape[0]
        if end > self.capacity:
            self._grow(end)
        self.k[layer, self.seq_len:end] = k
        self.v[layer, self.seq_len:end] = v

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        end = self.seq_len + q.shape[0]
        return causal_attention(q, self.k[layer, :end], self.v[layer, :end], self.seq_len)

    def close(self) -> None:
        self.k = self.v = torch.empty(0)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
