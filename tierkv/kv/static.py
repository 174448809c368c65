"""A fixed-capacity all-on-device cache whose decode path is driven by a device-side position, so a
captured CUDA graph of the decode step replays correctly at every position without host writes.
"""

from __future__ import annotations

import torch

from tierkv.kv.cache import DenseKVCache, causal_attention


class StaticKVCache(DenseKVCache):
    """DenseKVCache that never reallocates; `pos` (1,) on the device mirrors seq_len.

    Decode (T == 1) writes at `pos` and attends over the whole capacity with keys beyond `pos` masked,
    so shapes never change between steps. `advance` moves `pos` on the device (captured in graphs).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device, dtype, capacity: int) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype, capacity=capacity)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._slots = torch.arange(capacity, device=device)

    def _grow(self, need: int) -> None:
        raise RuntimeError(f"StaticKVCache holds {self.capacity} tokens; {need} were asked for")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        if k.shape[0] != 1:
            return super().append(layer, k, v, k_pre)
        self.k[layer].index_copy_(0, self.pos, k)
        self.v[layer].index_copy_(0, self.pos, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            return super().attend(layer, q)
        # Plain batched matmuls over all slots: SDPA's fused kernels parallelise over queries, of which
        # decode has one, and ran ~3x slower here on an H100.
        k, v = self.k[layer], self.v[layer]  # (S, Hkv, D)
        hkv, d = k.shape[1], k.shape[2]
        qg = q.view(hkv, -1, d)  # (Hkv, G, D)
        scores = torch.matmul(qg, k.permute(1, 2, 0)).float() * d**-0.5  # (Hkv, G, S)
        scores = scores.masked_fill(self._slots > self.pos, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v.transpose(0, 1))  # (Hkv, G, D)
        return out.reshape(1, -1, d)  # (1, Hq, D)

    def advance(self, n: int) -> None:
        super().advance(n)
        self.pos.add_(n)


__all__ = ["StaticKVCache", "causal_attention"]
