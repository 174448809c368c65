"""A fixed-capacity all-on-device cache whose decode path is driven by a device-side position, so a
captured CUDA graph of the decode step replays correctly at every position without host writes.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch
from tierkv.kv.cache import DenseKVCache


class StaticKVCache(DenseKVCache):
    """DenseKVCache that never reallocates; `pos` (1,) on the device mirrors seq_len.

    Decode (T == 1) writes at `pos` and attends over the whole capacity with keys beyond `pos` masked,
    so shapes never change between steps. `advance` moves `pos` on the device (captured in graphs).
    """

    kind = "static"
    fixed_capacity = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device, dtype, capacity: int) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype, capacity=capacity)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._kv_len = torch.ones(num_kv_heads, dtype=torch.long, device=device)  # pos + 1 per KV head
        self._attention = dispatch.get("decode_attention", device)

    def _grow(self, need: int) -> None:
        raise RuntimeError(f"StaticKVCache holds {self.capacity} tokens; {need} were asked for")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        if k.shape[0] != 1:
            return super().append(layer, k, v, k_pre)
        if layer == 0:
            self._kv_len.copy_((self.pos + 1).expand_as(self._kv_len))  # every KV head; read by attend
        self.k[layer].index_copy_(0, self.pos, k)
        self.v[layer].index_copy_(0, self.pos, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            return super().attend(layer, q)
        # Split-K decode attention over all slots with a device-side length: SDPA's fused kernels
        # parallelise over queries, of which decode has one, and ran ~3x slower on an H100.
        out, _ = self._attention(q[0], self.k[layer], self.v[layer], self._kv_len)  # (Hq, D)
        return out[None]  # (1, Hq, D)

    def advance(self, n: int) -> None:
        super().advance(n)
        self.pos.add_(n)

    def finish_import(self, num_tokens: int) -> None:
        super().finish_import(num_tokens)
        self.pos.fill_(num_tokens)

    def truncate(self, num_tokens: int) -> None:
        super().truncate(num_tokens)
        self.pos.fill_(num_tokens)

