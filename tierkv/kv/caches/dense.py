"""The all-on-device cache: every layer's K/V in one growing device buffer, exact causal attention."""

from __future__ import annotations

import torch

from tierkv.kernels.causal_attention import causal_attention
from tierkv.kv.caches.base import KVCache


class DenseKVCache(KVCache):
    """Every layer's K/V in preallocated tensors on one device; grows by doubling when full."""

    kind = "dense"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device: torch.device | str,
                 dtype: torch.dtype, capacity: int = 256, windows: tuple[int | None, ...] = ()) -> None:
        self.num_layers, self.seq_len = num_layers, 0
        # per layer: the sliding window (ModelConfig.layer_windows) or None; () for full attention everywhere.
        # Every position is kept (sessions export them all); attention reads only the window.
        self.windows = tuple(windows) or (None,) * num_layers
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
        return causal_attention(q, self.k[layer, :end], self.v[layer, :end], self.windows[layer])

    def close(self) -> None:
        self.k = self.v = torch.empty(0)

    def export_kv(self, layer: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        if not 0 <= start <= end <= self.seq_len:
            raise ValueError(f"range [{start}, {end}) is outside the {self.seq_len} cached positions")
        kv = torch.stack((self.k[layer, start:end], self.v[layer, start:end]))  # (2, T, Hkv, D)
        return kv if device is None else kv.to(device)

    def begin_import(self, num_tokens: int) -> None:
        super().begin_import(num_tokens)
        if num_tokens > self.capacity:
            self._grow(num_tokens)

    def import_kv(self, layer: int, start: int, kv: torch.Tensor) -> None:
        end = start + kv.shape[1]
        self.k[layer, start:end] = kv[0]
        self.v[layer, start:end] = kv[1]

    def truncate(self, num_tokens: int) -> None:
        if not 0 <= num_tokens <= self.seq_len:
            raise ValueError(f"cannot truncate {self.seq_len} cached positions to {num_tokens}")
        self.seq_len = num_tokens  # slots beyond are overwritten by the next append

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def placement_bytes(self) -> dict[str, int]:
        """K/V of the cached positions, all on the compute device (on the CPU that is host memory, reported as
        "device": the compute device's)."""
        per_token = 2 * self.k[0, 0].numel() * self.k.element_size() * self.num_layers
        return {"device": self.seq_len * per_token, "host": 0, "disk": 0}
