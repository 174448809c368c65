"""The cache contract beyond append/attend/advance, as explicit hooks with defaults: what tierkv/graph.py needs to
capture and replay a decode step, what tierkv/models/llama.py offers a cache that prefetches picks, and the session
state that save/resume, rollback and growth move (tierkv/session.py, tierkv/chat.py, kv/caches/base.copy_state).

KVCache (kv/caches/base.py) inherits all three, so a collaborator calls a hook directly instead of probing for it; a
cache overrides what it does differently.
"""

from __future__ import annotations

import torch


class GraphHooks:
    """What a captured decode step asks of its cache (tierkv/graph.py). The defaults fit a cache whose step never
    needs the host: no eager steps, nothing to do around a replay, buffers never reallocated."""

    seq_len: int = 0
    # bumped whenever a buffer a captured graph reads is reallocated: the graph is captured again then
    buffers_epoch: int = 0
    # a captured cache's position on the device, (1,) long: where the step writes, moved by `advance` inside the graph
    pos: torch.Tensor

    def needs_eager(self) -> bool:
        """Whether the next decode step makes host decisions (fit, fold, dense step) and so cannot replay."""
        return False

    def before_replay(self) -> None:
        """Host work before a replay (install reads ahead)."""

    def after_replay(self, n: int) -> None:
        """Host bookkeeping for n tokens whose device work (append, attend, advance) ran in a CUDA graph."""
        self.seq_len += n

    def redo_step(self) -> str | None:
        """After a replay: None when it is complete; "replay" or "eager" when it must be redone (and was undone)."""
        return None


class PickPrefetchHooks:
    """What the model offers a cache that prefetches the next layer's picks (tierkv/kv/sparse/predict.py)."""

    @property
    def prefetches_picks(self) -> bool:
        """Whether the model should hand over a predicted query after each layer's attention."""
        return False

    def predicted_query(self, layer: int, make_q) -> None:
        """Prefetch `layer`'s likely picks for the query make_q() returns (called only when prefetches_picks)."""


class SessionState:
    """Save, resume, roll back and grow. K/V move as (2, T, Hkv, D) token ranges per layer (K at [0], V at [1]), so
    a session saved from one cache kind loads into another; a cache with more state per token (sparse shadows,
    index) extends `extra_state` / `load_extra_state`, and `truncate` / `finish_import` for it."""

    seq_len: int = 0

    def export_kv(self, layer: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A copy of layer's K/V for positions [start, end) <= seq_len as (2, end-start, Hkv, D). Does not mutate."""
        raise NotImplementedError(f"{type(self).__name__} cannot export its K/V for a session")

    def begin_import(self, num_tokens: int) -> None:
        """Prepare an empty cache to receive num_tokens per layer through import_kv. Mutates."""
        if self.seq_len:
            raise RuntimeError(f"import needs an empty cache; this one holds {self.seq_len} tokens")

    def import_kv(self, layer: int, start: int, kv: torch.Tensor) -> None:
        """Write kv (2, T, Hkv, D) as layer's positions [start, start+T); ranges come in order per layer. Mutates."""
        raise NotImplementedError(f"{type(self).__name__} cannot import K/V from a session")

    def finish_import(self, num_tokens: int) -> None:
        """Commit an import: every layer now holds positions [0, num_tokens). Mutates."""
        self.seq_len = num_tokens

    def truncate(self, num_tokens: int) -> None:
        """Forget every position >= num_tokens (<= seq_len), also K/V appended but not advanced. Mutates."""
        raise NotImplementedError(f"{type(self).__name__} cannot be truncated")

    def can_truncate(self, num_tokens: int) -> bool:
        """Whether truncate(num_tokens) keeps what the next query reads (a sliding-window ring forgets its oldest
        positions: rolling back past them means prefilling again)."""
        return 0 <= num_tokens <= self.seq_len

    def export_start(self, layer: int) -> int:
        """The first position of layer that export_kv gives (a sliding-window ring holds only its newest ones)."""
        return 0

    def import_start(self, layer: int, num_tokens: int) -> int:
        """The first position of layer an import of num_tokens must bring: earlier ones are never attended again."""
        return 0

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors besides K/V that a session must save (none here). Subclasses add theirs. Does not mutate."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` returned, after finish_import. Mutates."""
        if tensors:
            raise RuntimeError(f"{type(self).__name__} has no extra state but got {sorted(tensors)[:3]}")
