"""The KV cache interface the model calls (append, attend, advance) and the all-on-device cache.

Batch size is 1 throughout; tensors are (T, H, D). Keys arrive post-RoPE, with the pre-RoPE keys
beside them for caches that build low-rank shadows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from tierkv.kernels.causal_attention import causal_attention
from tierkv.kv.interface import GraphHooks, PickPrefetchHooks, SessionState


class KVCache(GraphHooks, PickPrefetchHooks, SessionState, ABC):
    """Per-sequence K/V for every layer (the hooks it inherits: kv/interface.py).

    The model calls, for each forward of T new tokens: per layer `append` then `attend`; after the
    last layer `advance(T)`. Positions of the new tokens are [seq_len, seq_len + T).
    """

    seq_len: int = 0
    kind: str = "kv"  # the name stats report (kv/factory.py's kinds)
    # True: holds at most `capacity` positions, never reallocated (what a captured CUDA graph needs); a chat that
    # outgrows it moves to a larger cache with copy_state
    fixed_capacity: bool = False
    path: dict | None = None  # what kv/factory.py chose and why; None for a cache built by hand

    def record_path(self, choice: dict) -> None:
        """Remember the factory's choice (kind, captured, reason) for `stats()["path"]`. Mutates."""
        self.path = choice

    def placement_bytes(self) -> dict[str, int]:
        """Bytes of K/V (and what the cache keeps beside it) per tier: {"device", "host", "disk"}."""
        return {"device": 0, "host": 0, "disk": 0}

    def stats(self) -> dict:
        """The schema every cache shares: "cache" (kind), "path" (the factory's choice), "seq_len", "tier_bytes";
        subclasses add their own keys beside these. Does not mutate."""
        return {"cache": self.kind, "path": self.path, "seq_len": self.seq_len, "tier_bytes": self.placement_bytes(),
                "budget_bytes": self.budget_bytes()}

    def budget_bytes(self) -> dict[str, int | None]:
        """The byte budget per tier this cache keeps to (None: unbounded or no such tier)."""
        return {"device": None, "host": None, "disk": None}

    @abstractmethod
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        """Store keys k (T, Hkv, D, post-RoPE), values v (T, Hkv, D) and pre-RoPE keys for layer. Mutates."""

    @abstractmethod
    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Causal attention of q (T, Hq, D), the tokens just appended, over everything stored -> (T, Hq, D)."""

    def reset_stats(self) -> None:
        """Zero the counters stats() reports (a cache reused for another call). Mutates."""

    def advance(self, n: int) -> None:
        """Commit n tokens appended to every layer."""
        self.seq_len += n

    def begin_layer_prefill(self, n: int, activation_bytes: int) -> bool:
        """Whether this cache takes the next prefill of n tokens layer after layer (`LlamaModel.forward_by_layer`:
        each layer's appends cover the whole prompt, slice by slice, before the next layer's start); the model
        needs `activation_bytes` more device memory for it. None here: prefill goes slice after slice."""
        return False

    def close(self) -> None:
        """Release storage (files, pinned memory). Safe to call twice."""


def copy_state(src: KVCache, dst: KVCache, block_tokens: int = 1024) -> None:
    """Move src's whole session state (K/V of every tier, then `extra_state`) into the empty dst, as a saved
    session would load: how a fixed-capacity cache grows into a larger one. Blocks; mutates dst only."""
    n = src.seq_len
    dst.begin_import(n)
    for start in range(0, n, block_tokens):
        for layer in range(src.num_layers):
            dst.import_kv(layer, start, src.export_kv(layer, start, min(n, start + block_tokens)))
    dst.finish_import(n)
    dst.load_extra_state(src.extra_state())


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
