"""The KV cache interface the model calls (append, attend, advance), with the hooks of kv/interface.py, and
`copy_state`, which moves one cache's session state into another (a chat outgrowing a fixed-capacity cache).

Batch size is 1 throughout; tensors are (T, H, D). Keys arrive post-RoPE, with the pre-RoPE keys
beside them for caches that build low-rank shadows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

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

    def begin_layer_prefill(self, n: int, activation_bytes: int, device_limit: int | None = None) -> bool:
        """Whether this cache takes the next prefill of n tokens layer after layer (`LlamaModel.forward_by_layer`:
        each layer's appends cover the whole prompt, slice by slice, before the next layer's start); the model
        needs `activation_bytes` more device memory for it, and torch's allocations may reach `device_limit` at
        most (None: no limit but free memory). None here: prefill goes slice after slice."""
        return False

    def end_layer_prefill(self) -> None:
        """After a prefill `begin_layer_prefill` took, once the model freed its activations (or it failed)."""

    def attends_whole_layer(self, layer: int) -> bool:
        """Within a layer-major prefill: whether the model should append every slice of `layer` first and then
        call `attend_layer` once with the whole prompt's queries (one causal attention call per layer)."""
        return False

    def attend_layer(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Causal attention of the whole prompt's queries q (n, Hq, D) over layer's n staged keys -> (n, Hq, D)."""
        raise NotImplementedError(f"{type(self).__name__} has no whole-layer attention")

    def close(self) -> None:
        """Release storage (files, pinned memory). Safe to call twice."""


def copy_state(src: KVCache, dst: KVCache, block_tokens: int = 1024) -> None:
    """Move src's whole session state (K/V of every tier, then `extra_state`) into the empty dst, as a saved
    session would load: how a fixed-capacity cache grows into a larger one. Blocks; mutates dst only."""
    n = src.seq_len
    dst.begin_import(n)
    for start in range(0, n, block_tokens):
        for layer in range(src.num_layers):  # what src holds (a sliding-window ring: its newest positions)
            first, end = max(start, src.export_start(layer)), min(n, start + block_tokens)
            if first < end:
                dst.import_kv(layer, first, src.export_kv(layer, first, end))
    dst.finish_import(n)
    dst.load_extra_state(src.extra_state())
