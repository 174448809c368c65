"""The sparse graph cache's session state and rollback: K/V export and import across tiers (the disk tier
included), the shadows, index and unfolded pre-RoPE keys as named tensors, and `truncate`. A mixin of
SparseKVCache (kv/caches/sparse.py): it uses the cache's pool, shadows, index and ring.

The rule for a cut: the fit is kept when the cut leaves every token it was fitted on. Folds that took in removed
tokens are undone while the ring still holds their pre-RoPE keys (a chat turn's rollback of the last reply), so the
state equals that of a cache that never saw those tokens. Otherwise (as the oracle, kv/caches/eager_sparse.py, does
on any cut below a folded token) the cache is unfitted and refits at its next sparse step, with the
pre-RoPE keys of folded tokens recovered from the stored post-RoPE keys (kv/sparse/state.PendingKeys, slice by
slice at the refit, with no host copy) and the unfolded ones, exact, from the ring. The refit writes the new bases
in place, so a captured graph stays valid (`buffers_epoch` moves only when a buffer is reallocated: the host pool
on a spill, the resident copies).
"""

from __future__ import annotations

import torch

from tierkv.kv.sparse.state import SCORERS, check_meta, checked

# 3: the graph-capturable cache's own layout (shadow and index of every layer fitted together, one fit point);
# the oracle's sessions (format 2, kv/caches/eager_sparse.py) are refused with check_meta's message
STATE_VERSION = 3


class SparseSessionState:
    """SparseKVCache's export/import, extra state and truncate."""

    # ---- K/V across tiers ----------------------------------------------------------------------------
    def read_kv(self, layer: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of layer's post-RoPE K and V of positions [start, end), (T, Hkv, D) each on the compute device,
        from the host pool and, for the disk region, from disk (blocks on reads). Between forwards or eagerly."""
        k_pool, v_pool = self._flat(self.k_host, layer), self._flat(self.v_host, layer)
        dc, c = self.disk_chunks, self.chunk
        if dc is None:
            return k_pool[start:end].clone(), v_pool[start:end].clone()
        lo, hi, off = dc.lo * c, dc.hi * c, self.row_shift
        ks, vs = [], []
        if start < min(end, lo):
            ks.append(k_pool[start:min(end, lo)].clone())
            vs.append(v_pool[start:min(end, lo)].clone())
        a, b = max(start, lo), min(end, hi)
        if a < b:
            k, v = dc.read_tokens(layer, a, b, self.dtype, (self.hkv, self.d))
            ks.append(k.to(self.device))
            vs.append(v.to(self.device))
        if max(start, hi) < end:
            s = max(start, hi)
            ks.append(k_pool[s - off:end - off].clone())
            vs.append(v_pool[s - off:end - off].clone())
        return torch.cat(ks), torch.cat(vs)

    def export_kv(self, layer: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        if not 0 <= start <= end <= self.seq_len:
            raise ValueError(f"range [{start}, {end}) is outside the {self.seq_len} cached positions")
        kv = torch.stack(self.read_kv(layer, start, end))  # (2, T, Hkv, D)
        return kv if device is None else kv.to(device)

    def begin_import(self, num_tokens: int) -> None:
        super().begin_import(num_tokens)
        if num_tokens > self.capacity:
            raise RuntimeError(f"SparseKVCache holds {self.capacity} tokens; {num_tokens} were asked for")

    def import_kv(self, layer: int, start: int, kv: torch.Tensor) -> None:
        """Write kv (2, T, Hkv, D) at positions [start, start+T) of the pool and the resident copies."""
        kv = kv.to(self.device)
        end = start + kv.shape[1]
        self._flat(self.k_host, layer)[start:end].copy_(kv[0])
        self._flat(self.v_host, layer)[start:end].copy_(kv[1])
        at = self.res.rows(torch.arange(start, end, device=self.device))
        k_res, v_res = self.res.flat(layer)
        v_res.index_copy_(0, at, kv[1])
        if k_res is not None:
            k_res.index_copy_(0, at, kv[0])

    def finish_import(self, num_tokens: int) -> None:
        """Commit imported K/V unfitted: without a saved state to follow (load_extra_state), the cache refits at
        its first sparse step on pre-RoPE keys recovered from the imported keys."""
        super().finish_import(num_tokens)
        self.pos.fill_(num_tokens)
        self.fitted, self.fit_at = False, 0
        self._fit_buf = [[] for _ in range(self.num_layers)]
        self._pool_pre = [num_tokens] * self.num_layers  # un-rotated from the pool at the fit, if one comes

    # ---- shadows, index and unfolded keys ------------------------------------------------------------------
    def _meta(self) -> torch.Tensor:
        ix = self.index[0]
        return torch.tensor([STATE_VERSION, self.chunk, self.shadows[0].rank, ix.rank, SCORERS.index(self.sp.scorer),
                             self.seq_len])

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Fit flag and point; when fitted, every layer's shadow (basis, coefficients of covered tokens, chunk
        errors), score index (basis, int8 rows and scales of every token) and the unfolded pre-RoPE keys; before
        the fit, every token's pre-RoPE keys. Between forwards only. Does not mutate."""
        n = self.seq_len
        out = {"sparse.meta": self._meta(), "sparse.fitted": torch.tensor(int(self.fitted), dtype=torch.uint8),
               "sparse.fit_at": torch.tensor(self.fit_at)}
        starts = self._undoable_folds() if self.fitted else []
        if self.fitted:
            out["sparse.fold_starts"] = torch.tensor(starts, dtype=torch.int64)
        for layer in range(self.num_layers):
            p = f"sparse.{layer}."
            if not self.fitted:
                pre = self._pending_keys(layer)[0:n].to("cpu")
                if pre.shape[0] != n:
                    raise RuntimeError("the sparse state can be saved between forwards only (keys are pending)")
                out[p + "k_pre"] = pre
                continue
            sh, ix = self.shadows[layer], self.index[layer]
            cov = sh.covered
            keep = min([cov] + starts)  # pre-RoPE keys from the earliest fold a rollback may still undo
            out |= {p + "shadow.covered": torch.tensor(cov), p + "shadow.basis": sh.basis,
                    p + "shadow.coeffs": sh.coeffs[:cov], p + "shadow.chunk_err": sh.chunk_err[:cov // self.chunk],
                    p + "shadow.predicted_sq_err": sh.predicted_sq_err, p + "index.basis": ix.basis,
                    p + "index.coeffs": ix.coeffs[:, :n], p + "index.row_scale": ix.row_scale[:, :n],
                    p + "k_pre": self.k_pre[layer].index_select(0, self._ring_rows(keep, n))}
        return out

    def _undoable_folds(self) -> list[int]:
        """The fold starts a later cut could undo: those whose pre-RoPE keys the ring still holds (the rule of
        `_unfold`). Saved with the state so a resumed session or a grown cache unfolds as the live one would."""
        return [s for s in self._fold_starts if self.seq_len + 1 - s <= self.ring]

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `extra_state` after finish_import, into the reserved buffers. Raises ConfigError for a state saved
        with other settings or another format. When fitted, the resident copies and the disk tier are set up as
        after a fit. Mutates."""
        check_meta(tensors["sparse.meta"], self._meta())
        n, dev = self.seq_len, self.device
        # absent from states saved before fold starts were kept: a cut below their folds refits
        starts = [int(x) for x in tensors.get("sparse.fold_starts", torch.zeros(0, dtype=torch.int64)).tolist()]
        if not int(tensors["sparse.fitted"]):
            for layer in range(self.num_layers):
                pre = checked(tensors, f"sparse.{layer}.k_pre", (n, self.hkv, self.d), self.dtype)
                self._fit_buf[layer] = [pre.to("cpu")] if n else []
            self._pool_pre = [0] * self.num_layers
            return
        for layer in range(self.num_layers):
            p, sh, ix = f"sparse.{layer}.", self.shadows[layer], self.index[layer]
            cov = int(tensors[p + "shadow.covered"])
            sh.set_basis(checked(tensors, p + "shadow.basis", (sh.rank, self.hkv * self.d), self.dtype).to(dev))
            sh.coeffs[:cov].copy_(checked(tensors, p + "shadow.coeffs", (cov, sh.rank), self.dtype))
            sh.chunk_err[:cov // self.chunk].copy_(checked(tensors, p + "shadow.chunk_err", (cov // self.chunk,),
                                                           torch.float32))
            sh.predicted_sq_err = tensors[p + "shadow.predicted_sq_err"].to(dev)
            sh.covered = cov
            ix.set_basis(checked(tensors, p + "index.basis", (self.hkv, ix.rank, self.d), self.dtype).to(dev))
            ix.coeffs[:, :n].copy_(checked(tensors, p + "index.coeffs", (self.hkv, n, ix.rank), torch.int8))
            ix.row_scale[:, :n].copy_(checked(tensors, p + "index.row_scale", (self.hkv, n), torch.float32))
            ix.count = n
            saved = tensors.get(p + "k_pre")
            rows = saved.shape[0] if saved is not None and saved.dim() and n - cov <= saved.shape[0] <= n else n - cov
            pre = checked(tensors, p + "k_pre", (rows, self.hkv, self.d), self.dtype)
            # keys before the fit's cover are those of undoable folds; this cache's ring may hold fewer of them
            starts = [x for x in starts if x >= n - rows and n + 1 - x <= self.ring]
            keep = min([cov] + starts)
            self.k_pre[layer].index_copy_(0, self._ring_rows(keep, n), pre[keep - (n - rows):].to(dev))
            self._fit_buf[layer], self._pool_pre[layer] = [], 0
            self._mark_outliers(layer, 0, cov)
        self.fitted, self.fit_at = True, int(tensors["sparse.fit_at"])
        self._fold_starts = starts
        self._keep_outlier_keys(n)
        self._spill_to_disk(n)

    def _ring_rows(self, start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end, device=self.device).remainder(self.ring)

    # ---- rollback ---------------------------------------------------------------------------------------------
    def truncate(self, num_tokens: int) -> None:
        """Forget positions >= num_tokens, also K/V appended but not advanced (see the module docstring for the
        fit). The GPU chunk cache forgets every chunk (chunks past the cut will be rewritten). Mutates."""
        n = num_tokens
        if not 0 <= n <= self.seq_len:
            raise ValueError(f"cannot truncate {self.seq_len} cached positions to {n}")
        if self.fitted and (n < self.fit_at or any(n < sh.covered for sh in self.shadows)) and not self._unfold(n):
            self._unfit(n)
        elif self.fitted:
            for ix in self.index:
                ix.count = min(ix.count, n)
        else:
            for layer, buf in enumerate(self._fit_buf):  # keys of [pool_pre, seq_len) wait in the buffer
                upto = self._pool_pre[layer] = min(self._pool_pre[layer], n)
                self._fit_buf[layer] = [torch.cat(buf)[:n - upto]] if buf and n > upto else []
        self.seq_len = n
        self.pos.fill_(n)
        if self.chunk_cache:
            self.cached_ids.fill_(-1)

    def _unfold(self, n: int) -> bool:
        """A cut that keeps the fit's tokens but removes tokens a fold took in: undo the folds past the cut instead
        of refitting (a chat turn's rollback of the last reply would otherwise refit every shadow: 1.3 s at 32K on
        an H100). Exact while the ring still holds the pre-RoPE keys from the earliest undone fold's start on, so
        the state equals that of a cache that never saw the removed tokens. False when a refit is needed."""
        starts = self._fold_starts
        if n < self.fit_at or not starts:
            return False
        ends = starts[1:] + [self.covered]  # fold i took in tokens [starts[i], ends[i])
        undo = next((i for i, e in enumerate(ends) if e > n), None)  # the first fold that took in a token >= n
        if undo is None or self.seq_len + 1 - starts[undo] > self.ring:
            return False
        to = starts[undo]
        if to > n:  # the cut falls in a fold older than the kept history (a resumed state keeps the undoable ones)
            return False
        for layer, sh in enumerate(self.shadows):
            sh.unfold(to)
            self.outlier[layer, to // self.chunk:] = False
        self.covered_chunks.fill_(to // self.chunk)
        self._fold_starts = starts[:undo]
        for ix in self.index:
            ix.count = min(ix.count, n)
        self._n["unfolds"] += 1
        return True

    def _unfit(self, n: int) -> None:
        """Drop the fit: bring chunks on disk back to the host pool (the refit spills again), and buffer the pre-RoPE
        keys of [0, n) for the refit: folded ones un-rotated from the pool, unfolded ones from the ring."""
        if self.disk_chunks is not None:
            self._unspill(n)
        for layer in range(self.num_layers):  # folded keys stay in the pool until the refit un-rotates them
            cov = self._pool_pre[layer] = min(self.shadows[layer].covered, n)
            exact = self.k_pre[layer].index_select(0, self._ring_rows(cov, n))
            self._fit_buf[layer] = [exact.to("cpu")] if n > cov else []
        self.fitted, self.fit_at = False, 0
