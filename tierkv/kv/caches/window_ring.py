"""The K/V of sliding-window layers as fixed rings on the compute device (kv/caches/window_split.py composes them with a
tiered or sparse cache for the full-attention layers).

A layer whose queries see only the last `window` keys never reads an older one again, so it keeps the newest
`capacity` = window + ROLLBACK_ROOM positions, position p at row p mod capacity: no tiers, no shadows, no selection.
The room past the window lets a chat roll back a few tokens (a re-rendered reply) without losing what the next
query reads. Decode (one token) is driven by the device-side position `pos` and a fixed gather of the window's
rows, so it is graph-capturable; longer appends (prefill) read the window's older rows before writing theirs, so
a slice longer than the ring attends exactly as the dense cache does.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch
from tierkv.kernels.causal_attention import causal_attention

# positions a ring keeps beyond its window: how far a chat may roll back without prefilling again
ROLLBACK_ROOM = 256


def rings_nbytes(windows: tuple[int, ...], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 room: int = ROLLBACK_ROOM) -> int:
    """Device bytes of the K and V rings of sliding layers with these windows (WindowRings.nbytes, before building)."""
    return 2 * len(windows) * (max(windows) + room) * num_kv_heads * head_dim * dtype.itemsize


class WindowRings:
    """Rings (num_rings, capacity, Hkv, D) of K and V, one per sliding layer; ring r has windows[r].

    Host bookkeeping per ring: `pending[r]` tokens appended since the last advance (a layer-major prefill appends
    a whole prompt before it) and `first[r]`, the oldest position still intact. `pos` (1,) is the device-side
    position of the next token (shared with the cache that owns the decode step)."""

    def __init__(self, windows: tuple[int, ...], num_kv_heads: int, head_dim: int, *, device: torch.device,
                 dtype: torch.dtype, pos: torch.Tensor, room: int = ROLLBACK_ROOM) -> None:
        self.windows, self.device, self.dtype, self.pos = tuple(windows), torch.device(device), dtype, pos
        self.capacity = max(windows) + room
        shape = (len(windows), self.capacity, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pending = [0] * len(windows)
        self.first = [0] * len(windows)
        self.seq_len = 0
        self._attention = dispatch.get("decode_attention", device)
        # decode gathers each window's rows newest first (pos, pos - 1, ...; clamped at 0): the valid ones are a
        # prefix of length min(pos + 1, window), which the decode kernel takes as its length (no host sync)
        sizes = sorted(set(windows))
        self._offsets = {w: torch.arange(w, device=device) for w in sizes}
        self._rows = {w: torch.zeros(w, dtype=torch.long, device=device) for w in sizes}
        self._len = {w: torch.ones(num_kv_heads, dtype=torch.long, device=device) for w in sizes}
        self._slot = torch.zeros(1, dtype=torch.long, device=device)
        self._held: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # ring -> (K, V) a prefill slice attends

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def _slots(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device).remainder(self.capacity)

    # ---- forward ------------------------------------------------------------------------------------------------
    def append(self, r: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v (T, Hkv, D) as ring r's next T positions. Mutates."""
        t = k.shape[0]
        if t == 1 and not self.pending[r]:  # decode: the row at `pos`, found on the device (captured in a graph)
            if r == 0:
                self._slot.copy_(self.pos.remainder(self.capacity))
                for w, rows in self._rows.items():
                    rows.copy_((self.pos - self._offsets[w]).clamp_(min=0).remainder_(self.capacity))
                    self._len[w].copy_((self.pos + 1).clamp(max=w).expand_as(self._len[w]))
            self.k[r].index_copy_(0, self._slot, k)
            self.v[r].index_copy_(0, self._slot, v)
        else:  # prefill (eager): the window's older rows are read before this slice overwrites any of them
            p = self.seq_len + self.pending[r]
            lo = max(0, p - self.windows[r] + 1)
            old = self._slots(lo, p)
            self._held[r] = (torch.cat((self.k[r].index_select(0, old), k)),
                             torch.cat((self.v[r].index_select(0, old), v)))
            keep = min(t, self.capacity)
            at = self._slots(p + t - keep, p + t)
            self.k[r].index_copy_(0, at, k[t - keep:])
            self.v[r].index_copy_(0, at, v[t - keep:])
        self.pending[r] += t
        self.first[r] = max(self.first[r], self.seq_len + self.pending[r] - self.capacity)

    def attend(self, r: int, q: torch.Tensor) -> torch.Tensor:
        """Attention of q (T, Hq, D), the tokens just appended to ring r, over its window -> (T, Hq, D)."""
        w = self.windows[r]
        if q.shape[0] == 1 and r not in self._held:
            rows = self._rows[w]
            out, _ = self._attention(q[0], self.k[r].index_select(0, rows), self.v[r].index_select(0, rows),
                                     self._len[w])
            return out[None]
        k, v = self._held.pop(r)
        return causal_attention(q, k, v, w)

    def advance(self, n: int) -> None:
        """Commit n tokens appended to every ring (the device `pos` is advanced by its owner)."""
        self.seq_len += n
        self.pending = [0] * len(self.pending)
        self._held = {}  # a slice appended but never attended (a replayed prefill) must not feed the next step
        self.first = [max(f, self.seq_len - self.capacity) for f in self.first]

    # ---- rollback and sessions ----------------------------------------------------------------------------------
    def can_truncate(self, n: int) -> bool:
        """Whether every ring still holds the keys a query at position n reads: [n - window + 1, n)."""
        return 0 <= n <= self.seq_len and (n == 0 or all(f <= max(0, n - w + 1)
                                                         for f, w in zip(self.first, self.windows)))

    def truncate(self, n: int) -> None:
        """Forget positions >= n (also appended, not advanced); ValueError where a ring lost what n reads. Mutates."""
        if not self.can_truncate(n):
            raise ValueError(f"cannot roll the sliding-window rings back from {self.seq_len} to {n} tokens: they keep "
                             f"the last {self.capacity} positions only")
        self.seq_len, self.pending, self._held = n, [0] * len(self.pending), {}
        if n == 0:
            self.first = [0] * len(self.first)

    def export(self, r: int, start: int, end: int) -> torch.Tensor:
        """Ring r's K/V of positions [start, end) as (2, T, Hkv, D); start must be >= first[r]."""
        if not self.first[r] <= start <= end <= self.seq_len:
            raise ValueError(f"range [{start}, {end}) is outside the positions [{self.first[r]}, {self.seq_len}) the "
                             f"sliding-window ring holds")
        at = self._slots(start, end)
        return torch.stack((self.k[r].index_select(0, at), self.v[r].index_select(0, at)))

    def begin_import(self) -> None:
        self.first = [None] * len(self.first)

    def import_kv(self, r: int, start: int, kv: torch.Tensor) -> None:
        """Write kv (2, T, Hkv, D) as ring r's positions [start, start + T); only the newest `capacity` stay."""
        if self.first[r] is None:
            self.first[r] = start
        end, kv = start + kv.shape[1], kv.to(self.device)
        lo = max(start, end - self.capacity)
        at = self._slots(lo, end)
        self.k[r].index_copy_(0, at, kv[0, lo - start:])
        self.v[r].index_copy_(0, at, kv[1, lo - start:])

    def finish_import(self, n: int) -> None:
        """Commit an import of n positions per ring; a ring must have got every position its next query reads."""
        self.seq_len, self.pending, self._held = n, [0] * len(self.pending), {}
        for r, w in enumerate(self.windows):
            got = n if self.first[r] is None else self.first[r]
            if got > max(0, n - w + 1):
                raise ValueError(f"ring {r} got positions from {got} only; position {n} reads from {max(0, n - w + 1)}")
            self.first[r] = max(got, n - self.capacity)

    def read_bytes(self, n: int) -> int:
        """Bytes one decode step at position n reads from the rings (K and V of each window)."""
        per = 2 * self.k[0, 0].numel() * self.k.element_size()
        return sum(min(w, n + 1) for w in self.windows) * per
