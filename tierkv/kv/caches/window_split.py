"""A cache that keeps each layer only what it reads: sliding-window layers in rings on the compute device
(kv/caches/window_ring.py), full-attention layers in a tiered or sparse cache built for them alone.

A 5:1 local:global model (Gemma 3) so puts about a sixth of its K/V through the tiers; the rings cost a fixed
window's bytes per sliding layer however long the context grows. Every call is forwarded with the layer index
remapped: model layer i is ring `ring_of[i]` or the inner cache's layer `inner_of[i]`. The inner cache's device
position `pos` and token count are shared, so a captured decode step (tierkv/graph.py) that restores them restores
both parts. Sessions export a sliding layer's K/V from `export_start` on (what its ring still holds): earlier
positions are never attended again.
"""

from __future__ import annotations

import torch

from tierkv.config import format_size
from tierkv.errors import BudgetError
from tierkv.kv.caches.base import KVCache
from tierkv.kv.caches.window_ring import WindowRings


class WindowSplitKVCache(KVCache):
    """Rings for the layers with a window in `windows`, `inner` (or None: every layer slides) for the others."""

    def __init__(self, windows: tuple[int | None, ...], inner: KVCache | None, *, num_kv_heads: int, head_dim: int,
                 device: torch.device | str, dtype: torch.dtype, capacity: int) -> None:
        self.num_layers, self.windows = len(windows), tuple(windows)
        self.device, self.dtype, self.inner = torch.device(device), dtype, inner
        sliding = [i for i, w in enumerate(windows) if w is not None]
        full = [i for i, w in enumerate(windows) if w is None]
        if not sliding or (inner is None) != (not full) or (inner is not None and inner.num_layers != len(full)):
            raise ValueError(f"windows {windows} do not split into sliding layers and {inner and inner.num_layers} "
                             f"full-attention layers")
        self.ring_of = {i: r for r, i in enumerate(sliding)}
        self.inner_of = {i: g for g, i in enumerate(full)}
        self._seq = 0
        own_pos = inner is None or not hasattr(inner, "pos")
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device) if own_pos else inner.pos
        self._own_pos = own_pos
        self.rings = WindowRings(tuple(windows[i] for i in sliding), num_kv_heads, head_dim, device=self.device,
                                 dtype=dtype, pos=self.pos)
        self._capacity = capacity
        self._window_reads = 0  # bytes decode steps read from the rings (host count, also of replayed steps)
        # the inner cache's kind (what callers branch on); stats()["window"] describes the rings
        self.kind = inner.kind if inner is not None else "window"
        self.fixed_capacity = inner.fixed_capacity if inner is not None else True

    # ---- shape -------------------------------------------------------------------------------------------------
    @property
    def seq_len(self) -> int:
        return self.inner.seq_len if self.inner is not None else self._seq

    @seq_len.setter
    def seq_len(self, n: int) -> None:  # tierkv/graph.py restores it after a capture's warm-up steps
        self._seq = n
        if self.inner is not None:
            self.inner.seq_len = n
        self.rings.seq_len = n
        self.rings.pending = [0] * len(self.rings.pending)

    @property
    def capacity(self) -> int:
        return getattr(self.inner, "capacity", self._capacity) if self.inner is not None else self._capacity

    @property
    def buffers_epoch(self) -> int:
        return self.inner.buffers_epoch if self.inner is not None else 0

    # ---- forward -----------------------------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        if layer in self.ring_of:
            self.rings.append(self.ring_of[layer], k, v)
        else:
            self.inner.append(self.inner_of[layer], k, v, k_pre)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if layer in self.ring_of:
            return self.rings.attend(self.ring_of[layer], q)
        return self.inner.attend(self.inner_of[layer], q)

    def advance(self, n: int) -> None:
        if n == 1:
            self._window_reads += self.rings.read_bytes(self.seq_len)
        self.rings.advance(n)
        if self.inner is not None:
            self.inner.advance(n)  # moves `pos` where it is the inner cache's
        else:
            self._seq += n
        if self._own_pos:
            self.pos.add_(n)

    def begin_layer_prefill(self, n: int, activation_bytes: int, device_limit: int | None = None) -> bool:
        return self.inner is not None and self.inner.begin_layer_prefill(n, activation_bytes, device_limit)

    def end_layer_prefill(self) -> None:
        if self.inner is not None:
            self.inner.end_layer_prefill()

    def attends_whole_layer(self, layer: int) -> bool:
        # a ring holds only its window, so its layers attend slice by slice
        return layer in self.inner_of and self.inner.attends_whole_layer(self.inner_of[layer])

    def attend_layer(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        return self.inner.attend_layer(self.inner_of[layer], q)

    # ---- graph hooks -------------------------------------------------------------------------------------------
    def needs_eager(self) -> bool:
        return self.inner is not None and self.inner.needs_eager()

    def before_replay(self) -> None:
        if self.inner is not None:
            self.inner.before_replay()

    def after_replay(self, n: int) -> None:
        self._window_reads += n * self.rings.read_bytes(self.seq_len)
        self.rings.advance(n)
        if self.inner is not None:
            self.inner.after_replay(n)
        else:
            self._seq += n

    def redo_step(self) -> str | None:
        redo = self.inner.redo_step() if self.inner is not None else None
        if redo is not None:  # the inner cache undid the step (its seq_len and the shared pos): so do the rings
            self.rings.seq_len = self.seq_len
            self._window_reads -= self.rings.read_bytes(self.seq_len)
        return redo

    @property
    def prefetches_picks(self) -> bool:
        return self.inner is not None and self.inner.prefetches_picks

    def predicted_query(self, layer: int, make_q) -> None:
        if layer in self.inner_of:
            self.inner.predicted_query(self.inner_of[layer], make_q)

    # ---- sessions and rollback ---------------------------------------------------------------------------------
    def export_start(self, layer: int) -> int:
        return self.rings.first[self.ring_of[layer]] if layer in self.ring_of else 0

    def import_start(self, layer: int, num_tokens: int) -> int:
        w = self.windows[layer]
        return 0 if w is None else max(0, num_tokens - w + 1)

    def export_kv(self, layer: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        if layer in self.ring_of:
            kv = self.rings.export(self.ring_of[layer], start, end)
            return kv if device is None else kv.to(device)
        return self.inner.export_kv(self.inner_of[layer], start, end, device)

    def begin_import(self, num_tokens: int) -> None:
        super().begin_import(num_tokens)
        if self.inner is not None:
            self.inner.begin_import(num_tokens)
        self.rings.begin_import()

    def import_kv(self, layer: int, start: int, kv: torch.Tensor) -> None:
        if layer in self.ring_of:
            self.rings.import_kv(self.ring_of[layer], start, kv)
        else:
            self.inner.import_kv(self.inner_of[layer], start, kv)

    def finish_import(self, num_tokens: int) -> None:
        if self.inner is not None:
            self.inner.finish_import(num_tokens)
        self._seq = num_tokens
        self.pos.fill_(num_tokens)
        self.rings.finish_import(num_tokens)

    def can_truncate(self, num_tokens: int) -> bool:
        return self.rings.can_truncate(num_tokens)

    def truncate(self, num_tokens: int) -> None:
        """Forget positions >= num_tokens in both parts; ValueError (nothing changed) where a ring no longer holds
        what position num_tokens reads (a chat prefills again then: tierkv/chat.py). Mutates."""
        if not self.rings.can_truncate(num_tokens):
            self.rings.truncate(num_tokens)  # raises, naming the rings' reach
        if self.inner is not None:
            self.inner.truncate(num_tokens)
        self.rings.truncate(num_tokens)
        self._seq = num_tokens
        self.pos.fill_(num_tokens)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return self.inner.extra_state() if self.inner is not None else {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.inner is not None:
            self.inner.load_extra_state(tensors)
        else:
            super().load_extra_state(tensors)

    # ---- accounts ------------------------------------------------------------------------------------------------
    def record_path(self, choice: dict) -> None:
        super().record_path(choice)
        if self.inner is not None:
            self.inner.record_path(choice)

    def placement_bytes(self) -> dict[str, int]:
        """The inner cache's tiers, plus the rings (cached positions only) on the compute device."""
        out = dict(self.inner.placement_bytes()) if self.inner is not None else {"device": 0, "host": 0, "disk": 0}
        out["device"] += self._ring_bytes_held()
        return out

    def _ring_bytes_held(self) -> int:
        per = 2 * self.rings.k[0, 0].numel() * self.rings.k.element_size()
        return len(self.ring_of) * min(self.seq_len, self.rings.capacity) * per

    def budget_bytes(self) -> dict[str, int | None]:
        return self.inner.budget_bytes() if self.inner is not None else super().budget_bytes()

    def stats(self) -> dict:
        """The inner cache's stats (its keys, counters and `total`), with the shared keys for the whole cache and
        `window`: the rings' layers, windows, capacity, bytes and what decode read from them."""
        inner = self.inner.stats() if self.inner is not None else {}
        window = {"layers": sorted(self.ring_of), "windows": sorted(set(self.rings.windows)),
                  "capacity": self.rings.capacity, "reserved_bytes": self.rings.nbytes,
                  "reserved": format_size(self.rings.nbytes), "decode_read_bytes": self._window_reads,
                  "inner_layers": sorted(self.inner_of), "inner_cache": inner.get("cache")}
        out = {**inner, **super().stats(), "window": window}
        # ring reads are HBM traffic of each decode step (the bench's floor reads `total`)
        total = dict(inner.get("total") or {"hits": {}})
        total["bytes_moved"] = {**total.get("bytes_moved", {}), "kv_hbm": self._window_reads}
        out["total"] = total
        return out

    def reset_stats(self) -> None:
        self._window_reads = 0
        if self.inner is not None:
            self.inner.reset_stats()

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()
        self.rings.k = self.rings.v = torch.empty(0)


def ring_budget(tier, ring_bytes: int):
    """`tier` with kv_gpu_budget less the rings' bytes (they live on the compute device as well); BudgetError when
    the rings alone exceed it."""
    if tier.kv_gpu_budget is None:
        return tier
    left = tier.kv_gpu_budget - ring_bytes
    if left <= 0:
        raise BudgetError(f"kv_gpu_budget={format_size(tier.kv_gpu_budget)} cannot hold the sliding-window layers' "
                          f"rings ({format_size(ring_bytes)}); raise kv_gpu_budget above {format_size(ring_bytes)}")
    return tier.replace(kv_gpu_budget=left)
