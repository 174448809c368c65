"""A fixed-capacity all-on-device cache whose decode path is driven by a device-side position, so a
captured CUDA graph of the decode step replays correctly at every position without host writes.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch
from tierkv.kv.caches.dense import DenseKVCache


class StaticKVCache(DenseKVCache):
    """DenseKVCache that never reallocates; `pos` (1,) on the device mirrors seq_len.

    Decode (T == 1) writes at `pos` and attends over the whole capacity with keys beyond `pos` masked,
    so shapes never change between steps. `advance` moves `pos` on the device (captured in graphs).
    """

    kind = "static"
    fixed_capacity = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device, dtype, capacity: int,
                 windows: tuple[int | None, ...] = ()) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype, capacity=capacity,
                         windows=windows)
        self.pos = torch.zeros(1, dtype=torch.long, device=device)
        self._kv_len = torch.ones(num_kv_heads, dtype=torch.long, device=device)  # pos + 1 per KV head
        self._attention = dispatch.get("decode_attention", device)
        # Sliding-window decode gathers the window's rows newest first (pos, pos - 1, ...; clamped at 0), so the
        # valid ones are a prefix of length min(pos + 1, window): the same decode kernel (Triton on CUDA) takes a
        # window through its length argument, with no host sync. Buffers per window size, rewritten at layer 0.
        sizes = sorted({w for w in self.windows if w is not None})
        self._window_offsets = {w: torch.arange(w, device=device) for w in sizes}
        self._window_rows = {w: torch.zeros(w, dtype=torch.long, device=device) for w in sizes}
        self._window_len = {w: torch.ones(num_kv_heads, dtype=torch.long, device=device) for w in sizes}

    def _grow(self, need: int) -> None:
        raise RuntimeError(f"StaticKVCache holds {self.capacity} tokens; {need} were asked for")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        if k.shape[0] != 1:
            return super().append(layer, k, v, k_pre)
        if layer == 0:
            self._kv_len.copy_((self.pos + 1).expand_as(self._kv_len))  # every KV head; read by attend
            for w, rows in self._window_rows.items():
                rows.copy_((self.pos - self._window_offsets[w]).clamp_(min=0))
                self._window_len[w].copy_((self.pos + 1).clamp(max=w).expand_as(self._window_len[w]))
        self.k[layer].index_copy_(0, self.pos, k)
        self.v[layer].index_copy_(0, self.pos, v)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1:
            return super().attend(layer, q)
        # Split-K decode attention over all slots with a device-side length: SDPA's fused kernels
        # parallelise over queries, of which decode has one, and ran ~3x slower on an H100.
        window = self.windows[layer]
        if window is None:
            out, _ = self._attention(q[0], self.k[layer], self.v[layer], self._kv_len)  # (Hq, D)
        else:
            rows = self._window_rows[window]
            out, _ = self._attention(q[0], self.k[layer].index_select(0, rows), self.v[layer].index_select(0, rows),
                                     self._window_len[window])
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

