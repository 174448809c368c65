"""EagerSparseKVCache: the tiered cache whose decode steps attend only to sinks, the local window and picked chunks.

Prefill attends exactly. At the first sparse step of a layer its key shadow (kv/sparse/shadow.py) and score index
(kv/sparse/index.py) are fitted; each step then picks chunks per KV head (kv/sparse/select.py), fetches their values
through the tier manager and prefetcher, rebuilds their keys from the shadow and attends. Sessions save the
shadows, indexes and unfolded pre-RoPE keys beside K/V (kv/sparse/state.py); a truncation that cuts into a
layer's fit starts that layer over, refitted at its next sparse step.
"""

from __future__ import annotations

import time

import torch

from tierkv.config import TierConfig
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.placement.manager import EvictionPolicy
from tierkv.kv.sparse.select import SelectionPlan, merge_picks, plan_step
from tierkv.kv.sparse.shadow import KeyShadow, fold_due
from tierkv.kv.sparse.state import check_meta, checked, meta, pack_index, pack_shadow, take_tokens, trim_index, \
    unpack_index, unpack_shadow, unrope
from tierkv.kv.sparse.index import make_index
from tierkv.kv.sparse.options import RopeTables, SparseOptions
from tierkv.kernels.online_softmax import OnlineSoftmax
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions


class EagerSparseKVCache(TieredKVCache):
    """Tiered KV cache with sparse decode attention (attention="sparse").

    RoPE for rebuilt keys: pass `rope` (an object with cos/sin (S, D) tables and ensure(n)); without it the
    cache derives cos/sin per position from the (k, k_pre) pairs it is given (mode 'derived' in stats).
    The runtime never builds it (kv/factory.py picks kv/caches/sparse.py for attention="sparse"): it is the
    eager reference that tests compare the sparse cache with.
    """

    kind = "sparse-oracle"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device: torch.device | str,
                 dtype: torch.dtype, config: TierConfig, options: TieredOptions | None = None,
                 policy: EvictionPolicy | None = None, rope: RopeTables | None = None,
                 sparse: SparseOptions | None = None) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, device=device, dtype=dtype, config=config,
                         options=options, policy=policy)
        self.sp = sparse or SparseOptions()
        self.rope = rope
        dev = self.device
        self.shadows = [self._new_shadow() for _ in range(num_layers)]
        self.index = [self._new_index() for _ in range(num_layers)]
        self._fitted = [False] * num_layers
        self._fit_at = [0] * num_layers  # tokens (its first sparse step's included) when the layer was fitted
        # (k_pre, k) of tokens [start, seq_len + pending): start is shadow.covered once fitted, else _lost[layer]:
        # tokens [0, _lost) of an unfitted layer (after a cut into its fit, or an import) are read back from the
        # tiers and un-rotated at its fit
        self._buf: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(num_layers)]
        self._lost = [0] * num_layers
        self._cos = torch.zeros((0, head_dim), device=dev)  # derived tables (S_cap, D) fp32
        self._sin = torch.zeros((0, head_dim), device=dev)
        self._last_picks: list[list[ChunkId]] = [[] for _ in range(num_layers)]
        self._n = {"sparse_steps": 0, "dense_steps": 0, "attended_tokens": 0, "context_tokens": 0,
                   "rebuilt_tokens": 0, "predicted": 0, "predicted_used": 0, "needed": 0, "fetched": 0}
        self._t_select = 0.0

    def _new_shadow(self) -> KeyShadow:
        lay, cfg = self.layout, self.config
        # outliers are only marked: a picked chunk is fetched whole from its tier, exact keys included, so a
        # device copy of their keys would only spend GPU memory outside the KV budget
        return KeyShadow(lay.num_kv_heads, lay.head_dim, cfg.rank, lay.chunk_size,
                         outlier_threshold=self.sp.outlier_threshold, device=self.device, dtype=self.dtype,
                         keep_exact=False)

    def _new_index(self):
        lay, sp = self.layout, self.sp
        return make_index(sp.scorer, lay.num_kv_heads, lay.head_dim, sp.score_rank or self.config.score_rank,
                           lay.chunk_size, device=self.device, dtype=self.dtype, reduce=sp.reduce)

    # ---- writing ------------------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        """Store k, v (T, Hkv, D) in the tiers; keep k_pre and k for the shadow and index. Mutates; may fold."""
        if k_pre is None:
            raise ValueError("EagerSparseKVCache.append needs the pre-RoPE keys k_pre (the shadow compresses them)")
        super().append(layer, k, v, k_pre)
        if layer == 0 and self.rope is None:
            self._derive_rope(k_pre, k)
        if k.shape[0] > 1 and self.device.type == "cuda":
            # prefill keys wait for the first sparse step in host memory: on the GPU they would hold the whole
            # context's keys twice, outside the KV budget
            k_pre, k = k_pre.to("cpu"), k.to("cpu")
        self._buf[layer].append((k_pre, k))
        if self._fitted[layer]:
            self.index[layer].extend(k)
            self._maybe_fold(layer, self.seq_len + k.shape[0])

    def _derive_rope(self, k_pre: torch.Tensor, k: torch.Tensor) -> None:
        """cos/sin of positions [seq_len, seq_len+T) solved from k = k_pre*cos + rotate_half(k_pre)*sin."""
        x1, x2 = k_pre.float().chunk(2, dim=-1)  # (T, Hkv, D/2)
        y1, y2 = k.float().chunk(2, dim=-1)
        den = (x1 * x1 + x2 * x2).sum(1).clamp_min(1e-30)  # (T, D/2), least squares over heads
        c = (x1 * y1 + x2 * y2).sum(1) / den
        s = (x1 * y2 - x2 * y1).sum(1) / den
        start, end = self.seq_len, self.seq_len + k.shape[0]
        if end > self._cos.shape[0]:
            n = max(end, 2 * self._cos.shape[0])
            grow = [torch.cat([t, t.new_zeros(n - t.shape[0], t.shape[1])]) for t in (self._cos, self._sin)]
            self._cos, self._sin = grow
        self._cos[start:end] = torch.cat([c, c], dim=-1)
        self._sin[start:end] = torch.cat([s, s], dim=-1)

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rope is None:
            return self._cos, self._sin
        self.rope.ensure(length)
        return self.rope.cos, self.rope.sin

    def _maybe_fold(self, layer: int, total: int) -> None:
        """Fold rule: once >= fold_tokens sealed tokens lie beyond the shadow, project them onto its basis."""
        sh, c = self.shadows[layer], self.layout.chunk_size
        if not fold_due(total, sh.covered, c, self.sp.fold_tokens):
            return
        end = (total // c) * c
        pre = torch.cat([p.to(self.device) for p, _ in self._buf[layer]])  # (total - covered, Hkv, D)
        post = torch.cat([q.to(self.device) for _, q in self._buf[layer]])
        n = end - sh.covered
        sh.fold(pre[:n], post[:n])
        self._buf[layer] = [(pre[n:], post[n:])] if n < pre.shape[0] else []

    def _fit(self, layer: int, total: int) -> None:
        """Fit the layer's shadow and score index on the tokens before this step (all but the new one, so that a
        prefill can fit them as it ends: docs/ARCHITECTURE.md), cover their whole chunks, then index the new token
        as any later one. Mutates."""
        parts = self._buf[layer]
        if self._lost[layer]:
            parts = [self._recover(layer, self._lost[layer]), *parts]
            self._lost[layer] = 0
        pre = torch.cat([p.to(self.device) for p, _ in parts])  # (total, Hkv, D)
        post = torch.cat([q.to(self.device) for _, q in parts])
        seen = total - 1
        self.index[layer].fit(post[:seen])
        self.index[layer].extend(post[seen:])
        sh, n = self.shadows[layer], (seen // self.layout.chunk_size) * self.layout.chunk_size
        sh.fit(pre[:n], post[:n])  # basis from whole chunks; a partial tail stays exact
        self._buf[layer] = [(pre[n:], post[n:])] if n < total else []
        self._fitted[layer], self._fit_at[layer] = True, total

    def _recover(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_pre, k) of positions [0, n) from the tiers: post-RoPE keys as stored, pre-RoPE keys un-rotated
        (equal to the model's up to rounding). Blocks on tier reads."""
        k = self.export_kv(layer, 0, n)[0]  # (n, Hkv, D)
        cos, sin = self._tables(n)
        if cos.shape[0] < n:
            raise RuntimeError(f"no RoPE tables for positions [0, {n}): a sparse cache without `rope` gets them "
                               f"from appends or a saved state, not from imported K/V alone")
        return unrope(k, cos, sin), k

    # ---- attention -----------------------------------------------------------------------------------
    def plan(self, total: int) -> SelectionPlan:
        """The selection plan of a decode step over `total` tokens (the new one included)."""
        return plan_step(total, self.config)

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Prefill (T > 1) and steps whose budget covers the context: exact. Otherwise sparse: q (1, Hq, D)
        over sinks, window and picked chunks -> (1, Hq, D). Blocks on I/O; one host sync (the picks)."""
        total = self.seq_len + q.shape[0]
        plan = self.plan(total)
        if q.shape[0] > 1 or self._exact_step(plan):
            if layer == 0:
                self._n["dense_steps"] += q.shape[0] == 1
            return super().attend(layer, q)
        t0 = time.perf_counter()
        if not self._fitted[layer]:
            self._fit(layer, total)
        k = min(plan.picks, plan.candidates)
        if k:
            top = self.index[layer].top_chunks(q[0], plan.sink_end, plan.window_start, k)  # (Hkv, k)
        else:  # the budget holds only sinks and window
            top = torch.zeros((self.layout.num_kv_heads, 0), dtype=torch.long, device=self.device)
        ids, keep = merge_picks(top, plan)  # (n,), (Hkv, n)
        chunks = [ChunkId(layer, i) for i in ids.tolist()]  # the one host sync: the tier manager needs ids
        self._t_select += time.perf_counter() - t0
        out = self._attend_sparse(layer, q, plan, chunks, keep)
        self._last_picks[layer] = chunks
        if layer == 0:
            self._n["sparse_steps"] += 1
            self._n["context_tokens"] += total
        self._n["attended_tokens"] += int(plan.attended_tokens)
        return out

    def _exact_step(self, plan: SelectionPlan) -> bool:
        """Whether a decode step attends exactly: the budget covers every chunk (tests override it)."""
        return plan.dense

    def _attend_sparse(self, layer: int, q: torch.Tensor, plan: SelectionPlan, chunks: list[ChunkId],
                       keep: torch.Tensor) -> torch.Tensor:
        t0, io0 = time.perf_counter(), self.prefetcher.io_wait_s
        self._execute(self.manager.access(chunks, promote=self.sp.promote))
        col = {ch.index: j for j, ch in enumerate(chunks)}
        state = OnlineSoftmax(q, self.layout.num_kv_heads)
        queue, cur = self._first_fetch(layer, chunks)
        while cur is not None:
            nxt = self._prepare(queue.pop(0)) if queue else None
            if nxt is None:
                self._prefetch_next(layer)
            order, ticket = cur
            self._fold_sparse(state, layer, self.prefetcher.complete(ticket), order, col, keep, plan)
            cur = nxt
        c, start = self.layout.chunk_size, self.seq_len
        if plan.sealed * c < start:  # old tokens of the open chunk, exact, read in place
            m = start - plan.sealed * c
            state.add_span(self._open[layer, 0, :m], self._open[layer, 1, :m])
        k_new, v_new = self._pending.pop(layer)
        state.add_span(k_new, v_new, causal=q.shape[0] > 1)
        self._t["io_wait_s"] += self.prefetcher.io_wait_s - io0
        self._t["attend_s"] += time.perf_counter() - t0
        return state.result()

    def _first_fetch(self, layer: int, chunks: list[ChunkId]):
        """Use the prefetched batch if it was for this layer (counting how much of it was needed); return the
        batches still to fetch and the first ticket in flight."""
        ahead, self._ahead = self._ahead, None
        rest, cur = chunks, None
        if ahead is not None:
            a_layer, a_order, a_ticket = ahead
            if a_layer == layer:
                need = set(chunks)
                used = sum(ch in need for ch in a_order)
                self._n["predicted"] += len(a_order)
                self._n["predicted_used"] += used
                rest, cur = [ch for ch in chunks if ch not in set(a_order)], (a_order, a_ticket)
            else:
                self.prefetcher.complete(a_ticket)
        self._n["needed"] += len(chunks)
        self._n["fetched"] += len(rest)
        b = self.batch_chunks
        queue = [rest[i:i + b] for i in range(0, len(rest), b)]
        if cur is None and queue:
            cur = self._prepare(queue.pop(0))
        if cur is None:
            self._prefetch_next(layer)
        return queue, cur

    def _prefetch_next(self, layer: int) -> None:
        """Start fetching the next layer's picks of the previous step (selections change slowly)."""
        nxt = (layer + 1) % self.num_layers
        guess = [ch for ch in self._last_picks[nxt] if ch.index < self.manager.sealed(nxt)][: self.batch_chunks]
        if guess and self._ahead is None:
            order, ticket = self._prepare(guess)
            self._ahead = (nxt, order, ticket)

    def _fold_sparse(self, state: OnlineSoftmax, layer: int, rows: torch.Tensor, order: list[ChunkId],
                     col: dict[int, int], keep: torch.Tensor, plan: SelectionPlan) -> None:
        """Add a fetched batch: values as stored, keys rebuilt for covered picked chunks (exact otherwise)."""
        lay, c = self.layout, self.layout.chunk_size
        hkv, d = lay.num_kv_heads, lay.head_dim
        x = rows.view(self.dtype).view(len(order), *lay.shape)  # (n, 2, C, Hkv, D)
        cols = [col.get(ch.index, -1) for ch in order]
        kc = torch.tensor(cols, device=keep.device)  # (n,) column in keep, -1: prefetched but not needed
        k_head = torch.where(kc >= 0, keep[:, kc.clamp_min(0)], torch.zeros((), dtype=torch.bool, device=keep.device))
        pos = torch.tensor([ch.index for ch in order], device=keep.device)  # (n,)
        tok = (pos[:, None] * c + torch.arange(c, device=keep.device)).reshape(-1)  # (n*C,)
        mask = k_head.repeat_interleave(c, dim=1) & (tok < self.seq_len)  # (Hkv, n*C)
        k = x[:, 0].reshape(-1, hkv, d)  # (n*C, Hkv, D)
        v = x[:, 1].reshape(-1, hkv, d)
        sh = self.shadows[layer]
        if self.sp.rebuild:
            cov = [j for j, ch in enumerate(order) if cols[j] >= 0 and plan.sink_end <= ch.index < plan.window_start
                   and (ch.index + 1) * c <= sh.covered]
            if cov:
                sel = torch.tensor(cov, device=keep.device)
                cos, sin = self._tables(self.seq_len + 1)
                rebuilt = sh.keys(pos[sel], cos, sin).view(len(cov), c, hkv, d)  # (m, C, Hkv, D)
                outlier = sh.is_outlier(pos[sel])  # (m,) these keep the exact keys just read from their tier
                kc = k.view(-1, c, hkv, d)
                rebuilt = torch.where(outlier.view(-1, 1, 1, 1), kc[sel], rebuilt)
                k = kc.index_copy(0, sel, rebuilt).view(-1, hkv, d)
                self._n["rebuilt_tokens"] += (len(cov) - int(outlier.sum())) * c
        state.add(k, v, mask.view(hkv, 1, 1, -1))

    # ---- session state -------------------------------------------------------------------------------
    def _meta(self) -> torch.Tensor:
        sp = self.sp
        return meta(self.layout.chunk_size, self.shadows[0].rank, sp.score_rank or self.config.score_rank, sp.scorer,
                    self.seq_len)

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Fit flags and points, fitted layers' shadows and indexes, the buffered (not yet folded) pre-RoPE keys,
        the prefetch hints and derived RoPE tables, as named tensors. Between forwards only. Does not mutate."""
        out = {"sparse.meta": self._meta(), "sparse.fitted": torch.tensor(self._fitted, dtype=torch.uint8),
               "sparse.fit_at": torch.tensor(self._fit_at), "sparse.lost": torch.tensor(self._lost)}
        for layer in range(self.num_layers):
            p = f"sparse.{layer}."
            if self._fitted[layer]:
                out |= pack_shadow(self.shadows[layer], p + "shadow.") | pack_index(self.index[layer], p + "index.")
            pre = [k for k, _ in self._buf[layer]]
            if sum(k.shape[0] for k in pre) != self.seq_len - self._buf_start(layer):
                raise RuntimeError("the sparse state can be saved between forwards only (keys are pending)")
            if pre:  # post-RoPE keys are not saved: they are the stored K
                out[p + "k_pre"] = torch.cat([k.to("cpu") for k in pre])  # (seq_len - start, Hkv, D)
            out[p + "picks"] = torch.tensor([ch.index for ch in self._last_picks[layer]], dtype=torch.int64)
        if self.rope is None:
            out |= {"sparse.rope_cos": self._cos[:self.seq_len], "sparse.rope_sin": self._sin[:self.seq_len]}
        return out

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore `extra_state` after finish_import (K/V already in the tiers). Raises ConfigError for a state
        saved with other sparse settings. Mutates."""
        check_meta(tensors["sparse.meta"], self._meta())
        flags = zip(*(tensors[f"sparse.{n}"].tolist() for n in ("fitted", "fit_at", "lost")))
        keep_on = torch.device("cpu") if self.device.type == "cuda" else self.device  # where prefill keys wait
        for layer, (fitted, fit_at, lost) in enumerate(flags):
            p = f"sparse.{layer}."
            self._fitted[layer], self._fit_at[layer], self._lost[layer] = bool(fitted), fit_at, lost
            if fitted:
                unpack_shadow(self.shadows[layer], tensors, p + "shadow.")
                unpack_index(self.index[layer], tensors, p + "index.")
            start, self._buf[layer] = self._buf_start(layer), []
            if start < self.seq_len:
                post = self.export_kv(layer, start, self.seq_len, device=keep_on)[0]  # (T, Hkv, D)
                self._buf[layer] = [(checked(tensors, p + "k_pre", tuple(post.shape), post.dtype).to(keep_on), post)]
            self._last_picks[layer] = [ChunkId(layer, i) for i in tensors[p + "picks"].tolist()]
        if self.rope is None:
            self._cos, self._sin = (tensors[f"sparse.rope_{n}"].to(self.device) for n in ("cos", "sin"))

    def _buf_start(self, layer: int) -> int:
        """First position whose keys are in the layer's buffer."""
        return self.shadows[layer].covered if self._fitted[layer] else self._lost[layer]

    def finish_import(self, num_tokens: int) -> None:
        """Commit imported K/V: with no saved state to follow, every layer refits from the tiers' keys at its
        first sparse step (load_extra_state replaces this with the saved state). Mutates."""
        super().finish_import(num_tokens)
        self._lost = [num_tokens] * self.num_layers

    def truncate(self, num_tokens: int) -> None:
        """Forget positions >= num_tokens (also keys appended but not advanced) in the tiers and the sparse state.

        A layer keeps its fit when the cut leaves what it was fitted on and what was folded in; otherwise it is
        started over and refits at its next sparse step, its folded keys read back from the tiers (pre-RoPE keys
        un-rotated, so equal to a fresh fit up to rounding). Prefetch hints are dropped. Mutates.
        """
        forgets = num_tokens < self.seq_len
        super().truncate(num_tokens)
        for layer in range(self.num_layers):
            self._truncate_layer(layer, num_tokens)
        if forgets:
            self._last_picks = [[] for _ in range(self.num_layers)]

    def _truncate_layer(self, layer: int, n: int) -> None:
        sh = self.shadows[layer]
        if self._fitted[layer] and (n < self._fit_at[layer] or n < sh.covered):
            # the fit saw tokens past the cut, or folded some: start over. Tokens [0, covered) are buffered no more,
            # so the refit reads them back from the tiers; the buffered ones stay exact
            self._lost[layer] = sh.covered
            self.shadows[layer], self.index[layer] = self._new_shadow(), self._new_index()
            self._fitted[layer], self._fit_at[layer] = False, 0
        start = self._buf_start(layer)
        if n <= start:
            self._buf[layer] = []
            if not self._fitted[layer]:
                self._lost[layer] = n
        else:
            self._buf[layer] = take_tokens(self._buf[layer], n - start)
        if self._fitted[layer]:
            trim_index(self.index[layer], n, lambda a, b: self.export_kv(layer, a, b)[0])

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def stats(self) -> dict:
        """Tiered stats plus a 'sparse' section: budget, attended share, prefetch prediction, shadow sizes."""
        s = super().stats()
        n, layers = self._n, max(1, self.num_layers)
        steps = max(1, n["sparse_steps"])
        s["sparse"] = {
            "scorer": self.sp.scorer, "rank": self.shadows[0].rank,
            "score_rank": self.sp.score_rank or self.config.score_rank,
            "rope": "given" if self.rope is not None else "derived",
            "token_budget": self.config.token_budget, "budget_floor_tokens": self.config.budget_floor_tokens,
            "sparse_steps": n["sparse_steps"], "dense_steps": n["dense_steps"],
            "attended_fraction": n["attended_tokens"] / layers / max(1, n["context_tokens"]),
            "attended_tokens_per_layer_step": n["attended_tokens"] / layers / steps,
            "rebuilt_tokens": n["rebuilt_tokens"],
            "prefetch_recall": n["predicted_used"] / n["needed"] if n["needed"] else 0.0,
            "prefetch_precision": n["predicted_used"] / n["predicted"] if n["predicted"] else 0.0,
            "chunks_needed": n["needed"], "chunks_fetched_late": n["fetched"],
            "outlier_chunks": sum(sh.outlier_chunks for sh in self.shadows),
            "shadow_bytes": sum(sh.nbytes for sh in self.shadows),
            "index_bytes": sum(sc.nbytes for sc in self.index),
            "select_s": self._t_select,
        }
        return s

    def close(self) -> None:
        """Release the tiers and the shadows. Safe to call twice."""
        self._buf = [[] for _ in range(self.num_layers)]
        super().close()
