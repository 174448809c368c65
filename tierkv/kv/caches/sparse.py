"""SparseKVCache: sparse decode whose steps are safe to capture in a CUDA graph.

Every token's K and V live in one pinned host pool that the GPU reads in place (mapped, zero-copy); the GPU
holds the low-rank key shadows, the score index (int8), a small ring of recent pre-RoPE keys and, in what
kv_gpu_budget leaves, a copy of the values of the last chunks (on real text most picks are recent; those read no
host memory), with their keys too when most chunks are outliers and every chunk fits. A decode step scores
chunks, picks the top ones per KV head and attends sinks + window + open chunk + picks in one kernel,
with picked keys rebuilt from the shadow: no host sync and no host decision, so the step can be replayed.
An optional GPU chunk cache (chunk_cache=True) keeps, per layer and KV head, chunks picked in earlier steps (on
real text most picks repeat from one step to the next): only missed picks cross the host link, then attention
reads every pick from the cache (with prefetch=True, predicted picks are copied there a layer ahead:
kv/sparse/predict.py). With a disk_dir and a cpu_budget below the pool, the oldest chunks move to disk after prefill
(kv/caches/sparse_disk.py, kv/placement/disk.py).
Fitting the shadows and folding new keys into them happen in the few steps that run eagerly (`needs_eager`).
"""

from __future__ import annotations

import contextlib
import math

import torch

from tierkv.config import TierConfig, format_size
from tierkv.errors import BudgetError, ConfigError
from tierkv.io.pinned import pool_buffer
from tierkv.io.staging import alloc_host, pinning_available
from tierkv.kernels import chunk_topk, shadow_paged_attention, sparse_entries
from tierkv.kernels.append_token import append_token
from tierkv.kernels.chunk_cache import chunk_cache_assign, chunk_cache_fill
from tierkv.kernels.causal_attention import causal_attention
from tierkv.kv.caches.base import KVCache
from tierkv.kv.placement.disk import DiskChunks
from tierkv.kv.caches.sparse_disk import DiskTierSteps, capturing
from tierkv.kv.caches.sparse_session import SparseSessionState
from tierkv.kv.caches.layer_prefill import LayerPrefillSteps
from tierkv.kernels.online_softmax import OnlineSoftmax
from tierkv.kv.sparse.predict import PickPrefetch
from tierkv.kv.storage.resident import ResidentChunks
from tierkv.kv.sparse.select import DeviceStepPlan, class_sizes, plan_on_device, plan_step
from tierkv.kv.sparse.shadow import KeyShadow, fold_due
from tierkv.kv.sparse.options import RopeTables, SparseOptions
from tierkv.kv.sparse.index import LowRankIndex
from tierkv.kv.sparse.state import PendingKeys
from tierkv.kv.storage.host import check_host_budget, map_pinned


FIT_SLICE = 16384  # tokens per slice when fitting shadows and index (rounded down to whole chunks)
# keys per fused attention call when a prefill slice attends a longer context: K/V stream from the host pool in
# spans merged by log-sum-exp (one call over 256K keys copied them whole and widened them 4x for GQA: 5 GiB)
EXACT_SPAN = 16384
# the step's small device tensors (position, counters, the step plan, per-layer read counts): a few hundred bytes
# that kv_gpu_budget must hold too, some of them made only at the first sparse step
STEP_STATE_BYTES = 4096
# with no kv_gpu_budget on CUDA, resident values leave this much of the free GPU memory to prefill activations
AUTO_RESERVE = 3 * 1024**3


class SparseKVCache(SparseSessionState, DiskTierSteps, LayerPrefillSteps, KVCache):
    """Fixed-capacity sparse cache (attention="sparse") whose decode step is graph-capturable.

    Selection semantics equal EagerSparseKVCache's (same plan, scorer, fold rule and key rebuild), so the two give
    the same tokens; only where bytes live differs. `pos` (1,) on the device mirrors seq_len.
    """

    kind = "sparse"
    fixed_capacity = True

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device: torch.device | str,
                 dtype: torch.dtype, config: TierConfig, capacity: int, rope: RopeTables,
                 sparse: SparseOptions | None = None, max_append: int | None = None,
                 track_repeats: bool = False, chunk_cache: bool = False, prefetch: bool = False) -> None:
        self.sp = sp = sparse or SparseOptions()
        if sp.scorer != "lowrank" or not sp.rebuild:
            raise ValueError("SparseKVCache supports the 'lowrank' scorer with rebuilt keys only")
        self.device, self.dtype, self.config, self.rope = torch.device(device), dtype, config, rope
        self.num_layers, self.hkv, self.d = num_layers, num_kv_heads, head_dim
        sizes = class_sizes(config, capacity)
        c = self.chunk = sizes.chunk
        self.n_chunks, self.capacity = sizes.n_chunks, sizes.capacity
        self.sink_chunks, self.window_chunks, self.max_picks = sizes.sink_chunks, sizes.window_chunks, sizes.max_picks
        self.seq_len = 0
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.step_plan: DeviceStepPlan | None = None  # this step's plan, made at layer 0 (read by kv/sparse/predict.py)
        # pre-RoPE keys of tokens not yet folded into the shadow; a fold happens before fold_tokens + a chunk
        # accumulate, and one append adds at most max_append (a prefill slice)
        self.max_append = max_append or config.prefill_chunk
        self.ring = sp.fold_tokens + 2 * c + self.max_append
        self.k_pre = torch.zeros((num_layers, self.ring, num_kv_heads, head_dim), device=self.device, dtype=dtype)
        self.shadows = [KeyShadow(num_kv_heads, head_dim, config.rank, c, outlier_threshold=sp.outlier_threshold,
                                  device=self.device, dtype=dtype, keep_exact=False) for _ in range(num_layers)]
        self.index = [LowRankIndex(num_kv_heads, head_dim, sp.score_rank or config.score_rank, c, shared=False,
                                   reduce=sp.reduce, device=self.device, dtype=dtype) for _ in range(num_layers)]
        for sh, ix in zip(self.shadows, self.index):
            sh.reserve(self.capacity)
            ix.reserve(self.capacity)
        self.outlier = torch.zeros((num_layers, self.n_chunks), dtype=torch.bool, device=self.device)
        self.covered_chunks = torch.zeros(1, dtype=torch.long, device=self.device)  # device mirror of `covered`
        self._fit_buf: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]  # k_pre on the host until the fit
        # per layer: positions [0, n) whose pre-RoPE keys the fit un-rotates from the pool (after a rollback that
        # unfits, or an import); _fit_buf then holds the keys from n on
        self._pool_pre = [0] * num_layers
        self.fitted, self.fit_at = False, 0  # fit_at: tokens (the first sparse step's included) when the fit ran
        self._fold_starts: list[int] = []  # `covered` before each fold since the fit: where a rollback can unfold to
        # bumped whenever a buffer that a captured decode graph reads is reallocated (pool, fit, resident copies,
        # disk tier): tierkv/graph.py captures again then
        self.buffers_epoch = 0
        self._disk_step_ran = False
        self.res: ResidentChunks | None = None  # GPU copies of the last chunks (`_alloc_resident`)
        self._alloc_host_pool()
        # fits: whole fits and refits; unfolds: rollbacks that undid folds instead of refitting
        self._n = {"sparse_steps": 0, "dense_steps": 0, "folds": 0, "fits": 0, "unfolds": 0}
        # what sparse steps read beyond the shadow: [fixed-entry tokens (their K and V) over heads and layers,
        # attended picks, picks with exact keys, picks and fixed tokens in resident slots, exact-key picks in
        # resident slots]; with the chunk cache also [exact-key misses, hits, picks]
        self.read_counts = torch.zeros(6, dtype=torch.long, device=self.device)
        # chunk cache: per layer max_picks slots (+1 scratch) of K and V for every KV head; cached_ids says which
        # chunk each (head, slot) holds
        self.chunk_cache = chunk_cache = chunk_cache or prefetch
        if prefetch and config.disk_dir is not None and config.cpu_budget is not None:
            raise ConfigError("prefetch_picks does not work with a disk tier yet; drop it or "
                              "disk_dir")
        if chunk_cache:
            slots = (num_layers, self.max_picks + 1, c, num_kv_heads, head_dim)
            self.k_cache = torch.zeros(slots, device=self.device, dtype=dtype)
            self.v_cache = torch.zeros(slots, device=self.device, dtype=dtype)
            self.cached_ids = torch.full((num_layers, num_kv_heads, self.max_picks), -1, dtype=torch.long,
                                         device=self.device)
            self.cache_counts = torch.zeros(3, dtype=torch.long, device=self.device)
        # track_repeats: count how many picks the same layer also picked the step before, the hit rate a GPU chunk
        # cache of last step's picks would have (a few small kernels per layer; off by default)
        self.track_repeats = track_repeats
        if track_repeats:
            self._last_top = torch.full((num_layers, num_kv_heads, self.max_picks), -1, dtype=torch.long,
                                        device=self.device)
            self._repeats = torch.zeros(2, dtype=torch.long, device=self.device)  # repeated picks, picks
        self._alloc_resident()
        self.prefetch = PickPrefetch(self) if prefetch else None
        self.disk_chunks: DiskChunks | None = None  # the oldest chunks on disk once cpu_budget binds (`_spill_to_disk`)

    # ---- storage ------------------------------------------------------------------------------------
    def _alloc_host_pool(self) -> None:
        """K and V of every position, (L, N, C, Hkv, D) each, pinned and mapped for the GPU (plain on the CPU).
        With a disk_dir, cpu_budget binds from the first sparse step: prefill attends every earlier token, so the
        pool holds them all until the oldest chunks move to disk (`_spill_to_disk`)."""
        shape = (self.num_layers, self.n_chunks, self.chunk, self.hkv, self.d)
        nbytes = math.prod(shape) * torch.finfo(self.dtype).bits // 8
        budget = self.config.cpu_budget
        if budget is not None and 2 * nbytes > budget and self.config.disk_dir is None:
            raise BudgetError(f"cpu_budget={format_size(budget)} cannot hold the {format_size(2 * nbytes)} of K/V that "
                              f"{self.capacity} tokens need in host memory; raise cpu_budget or give disk_dir")
        if budget is not None and 2 * nbytes > budget and budget < self._min_disk_host():
            raise BudgetError(f"cpu_budget={format_size(budget)} is below the {format_size(self._min_disk_host())} of "
                              f"host memory the sparse cache needs at least (sinks, window and slots for chunks read "
                              f"from disk); raise cpu_budget")
        self._set_pool(shape)

    def _set_pool(self, shape: tuple[int, ...]) -> None:
        """Allocate the host pool (K and V of `shape` each) and its device-readable views k_host, v_host. On CUDA
        the pool is pinned a layer at a time (io/pinned.RegionPinned): a layer-major prefill pins each layer as
        it writes it (`pool_layer`); any other use of k_host/v_host pins what is left first."""
        nbytes = math.prod(shape) * torch.finfo(self.dtype).bits // 8
        check_host_budget(2 * nbytes, "host memory for the sparse cache's K/V")
        if self.device.type == "cuda":
            if not pinning_available():
                raise RuntimeError("the sparse graph cache needs pinned host memory, which torch cannot allocate here")
            self._pins = [pool_buffer(nbytes, regions=shape[0]) for _ in range(2)]
            self._host = [p.tensor for p in self._pins]  # uint8 storage; keeps it alive
            views = [map_pinned(h, self.device) for h in self._host]
        else:
            self._pins = []
            self._host = views = [alloc_host(nbytes, pin=False) for _ in range(2)]
        self._k_pool, self._v_pool = (v.view(self.dtype).view(shape) for v in views)  # device-readable views
        self.pool_shape = tuple(shape)
        self.host_bytes = 2 * nbytes
        self.buffers_epoch += 1

    @property
    def k_host(self) -> torch.Tensor:
        """The pool's keys (L, rows, C, Hkv, D), readable by the compute device; pinned whole on first use."""
        self._pin_pool()
        return self._k_pool

    @property
    def v_host(self) -> torch.Tensor:
        self._pin_pool()
        return self._v_pool

    def _pin_pool(self) -> None:
        if self._pins and not self._pins[-1].all_pinned:
            for p in self._pins:
                p.pin_all()

    def pool_layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V rows (rows * C, Hkv, D), that layer's part of the pool pinned first (prefill)."""
        for p in self._pins:
            p.pin(layer)
        return self._flat(self._k_pool, layer), self._flat(self._v_pool, layer)

    def _alloc_resident(self, keys: bool = False) -> None:
        """GPU copies (kv/storage/resident.py) of the values (keys=True: and keys) of as many of the last chunks as
        kv_gpu_budget leaves after the shadows, index and ring (no budget: free CUDA memory less AUTO_RESERVE; none
        on the CPU, where the pool already is the compute device's memory, nor beside the chunk cache)."""
        self.buffers_epoch += 1
        per_chunk = self._chunk_bytes() * (2 if keys else 1)
        n = max(0, min(self.n_chunks, self._resident_room() // per_chunk - 1))  # - 1: the scratch row
        self.res = ResidentChunks(self.pool_shape, n, keys=keys, device=self.device, dtype=self.dtype)

    def _chunk_bytes(self) -> int:
        """Bytes of one chunk's values (or keys) over all layers."""
        return self.num_layers * self.chunk * self.hkv * self.d * self.dtype.itemsize

    def _resident_room(self) -> int:
        """GPU bytes the resident copies may take; counts what they hold now as free."""
        budget = self.config.kv_gpu_budget
        held = self.res.nbytes if self.res is not None else 0
        if budget is None and self.device.type != "cuda":
            return 0
        if budget is None:
            return torch.cuda.mem_get_info(self.device)[0] + held - AUTO_RESERVE
        return budget - self._device_bytes()

    def _keep_outlier_keys(self, total: int) -> None:
        """After the fit: when most chunks are outliers (keys the shadow cannot rebuild, read exactly on every pick)
        and the budget holds keys and values of every chunk, keep the keys on the GPU too. (Short of every chunk,
        keys halve the resident chunks and, for evenly spread picks, read more over the link than they save.)
        Eager: one host sync. Keys already resident stay (appends and prefills write them): reallocating would
        make a captured decode graph capture again."""
        if (self.res is not None and self.res.k is not None) or self._lent is not None:
            return  # (while lent to a layer-major prefill, end_layer_prefill asks again)
        if self._resident_room() < 2 * (self.n_chunks + 1) * self._chunk_bytes():
            return
        if float(self.outlier[:, :total // self.chunk].float().mean()) <= 0.5:
            return
        self.res = None  # the pair needs this memory back: free it before asking
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self._alloc_resident(keys=True)
        self.res.copy_from(self.k_host, self.v_host, total)

    def _device_bytes(self) -> int:
        """GPU bytes of the shadows, index, ring, outlier flags, chunk cache and step state (not the resident
        values)."""
        b = sum(sh.nbytes for sh in self.shadows) + sum(ix.nbytes for ix in self.index) + STEP_STATE_BYTES
        b += self.k_pre.numel() * self.k_pre.element_size() + self.outlier.numel()
        if self.chunk_cache:
            b += 2 * self.v_cache.numel() * self.v_cache.element_size() + self.cached_ids.numel() * 8
        return b

    @property
    def covered(self) -> int:
        """Tokens with shadow coefficients (chunk-aligned); every layer folds at the same steps."""
        return self.shadows[-1].covered

    def _fold_due(self, total: int, covered: int) -> bool:
        return fold_due(total, covered, self.chunk, self.sp.fold_tokens)

    def _flat(self, pool: torch.Tensor, layer: int) -> torch.Tensor:
        return pool[layer].view(-1, self.hkv, self.d)  # (rows * C, Hkv, D); token p at row p - row_shift

    # ---- writing ------------------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        """Store k, v, k_pre (T, Hkv, D) at positions [seq_len, seq_len+T) (T == 1: at the device `pos`).
        Mutates; a multi-token append or an eager step may fit or fold the shadow (host decisions)."""
        if k_pre is None:
            raise ValueError("SparseKVCache.append needs the pre-RoPE keys k_pre (the shadow compresses them)")
        if self.staging is not None:
            return self._stage(layer, k, v, k_pre)
        t = k.shape[0]
        if t > self.max_append:
            raise ValueError(f"SparseKVCache takes at most {self.max_append} tokens per append (a prefill slice); "
                             f"got {t}")
        if self.seq_len + t > self.capacity:
            raise RuntimeError(f"SparseKVCache holds {self.capacity} tokens; {self.seq_len + t} were asked for")
        if t == 1:
            if layer == 0:  # the same slots in every layer: once per step
                self._ring_at, self._res_at = self.pos.remainder(self.ring), self.res.rows(self.pos)
                self._pool_at = self.pos - self.row_shift
            at, ring_at, res_at = self._pool_at, self._ring_at, self._res_at
        else:  # new tokens always lie after the disk region: their pool rows are shifted past it
            pos = torch.arange(self.seq_len, self.seq_len + t, device=self.device)
            at, ring_at, res_at = pos - self.row_shift, pos.remainder(self.ring), self.res.rows(pos)
        k_pool, v_pool = self._flat(self.k_host, layer), self._flat(self.v_host, layer)  # GPU-written, host memory
        k_res, v_res = self.res.flat(layer)
        if t == 1 and self.fitted:  # a decode token: every write and its index row in one kernel
            ix = self.index[layer]
            append_token(k, v, k_pre, self.pos, at, k_pool, v_pool, k_res, v_res, res_at, self.k_pre[layer], ring_at,
                         ix.basis, ix.coeffs, ix.row_scale)  # the index by position, the pool at its row
        else:
            k_pool.index_copy_(0, at, k)
            v_pool.index_copy_(0, at, v)
            v_res.index_copy_(0, res_at, v)
            if k_res is not None:
                k_res.index_copy_(0, res_at, k)
            self.k_pre[layer].index_copy_(0, ring_at, k_pre)
            if not self.fitted:
                self._fit_buf[layer].append(k_pre.to("cpu"))
                return
            self.index[layer].count = self.seq_len
            self.index[layer].extend(k)
        if not capturing():
            self._maybe_fold(layer, self.seq_len + t)

    def _maybe_fold(self, layer: int, total: int) -> None:
        """Fold the sealed tokens beyond the layer's shadow into it when `_fold_due`. Eager only."""
        start = self.shadows[layer].covered
        if not self._fold_due(total, start):
            return
        end = (total // self.chunk) * self.chunk
        at = torch.arange(start, end, device=self.device)
        off = self.row_shift  # folds are of recent tokens: never in the disk region
        self.shadows[layer].fold(self.k_pre[layer].index_select(0, at.remainder(self.ring)),
                                 self._flat(self.k_host, layer)[start - off:end - off])
        self._mark_outliers(layer, start, end)
        if layer == self.num_layers - 1:
            self._n["folds"] += 1
            self._fold_starts.append(start)

    def _mark_outliers(self, layer: int, start: int, end: int) -> None:
        sh, c = self.shadows[layer], self.chunk
        self.outlier[layer, start // c:end // c] = sh.is_outlier(slice(start // c, end // c))
        if layer == 0:  # every layer fits and folds at the same steps, each before its own attention
            self.covered_chunks.fill_(end // c)

    def _fit(self, layer: int, total: int) -> None:
        """The first sparse step: fit on the tokens before it (EagerSparseKVCache's rule), pre-RoPE keys from the host
        buffer and post-RoPE keys from the pool, then index this step's token as any later one. Eager only."""
        posts = self._flat(self.k_host, layer)
        pre = self._pending_keys(layer)  # (total, Hkv, D)
        self._fit_buf[layer], self._pool_pre[layer] = [], 0
        self._fit_keys(layer, total - 1, pre, posts)
        self.index[layer].extend(posts[total - 1:total].clone())
        if layer == self.num_layers - 1:
            self._finish_fit(total)

    def _pending_keys(self, layer: int) -> PendingKeys:
        """The pre-RoPE keys of the layer's tokens that wait for the fit; the pool part is read only when sliced."""
        upto = self._pool_pre[layer]
        if upto and self.row_shift:
            raise RuntimeError("pre-RoPE keys to recover from the pool, but part of it is on disk")
        buf = self._fit_buf[layer]
        tail = torch.cat(buf) if buf else self.k_pre.new_zeros((0, self.hkv, self.d), device="cpu")
        if upto:
            self.rope.ensure(upto + 1)
        return PendingKeys(self._flat(self.k_host, layer), upto, tail, self.rope.cos, self.rope.sin)

    def _fit_keys(self, layer: int, seen: int, pre: torch.Tensor, posts: torch.Tensor) -> None:
        """Fit the layer's shadow and index on tokens [0, seen) and index them: pre holds their pre-RoPE keys
        (at least the whole chunks), posts their post-RoPE keys, each on any device (host memory or the GPU).
        Works in slices of FIT_SLICE tokens, so a 256K context needs no more than a slice's fp32 copies at once."""
        dev, n = self.device, (seen // self.chunk) * self.chunk
        step = max(1, FIT_SLICE // self.chunk) * self.chunk  # whole chunks, so folds judge every chunk
        f = self.hkv * self.d
        gram = torch.zeros((f, f), device=dev)
        grams = torch.zeros((self.hkv, self.d, self.d), device=dev)
        for s in range(0, seen, step):
            x = posts[s:min(seen, s + step)].to(dev).float().transpose(0, 1)  # (Hkv, T, D)
            grams += torch.bmm(x.transpose(1, 2), x)
            if s < n:
                p = pre[s:min(n, s + step)].to(dev).float().reshape(-1, f)  # (T, Hkv*D)
                gram += p.T @ p
        ix, sh = self.index[layer], self.shadows[layer]
        ix.fit_grams(grams)
        sh.fit_gram(gram)
        for s in range(0, seen, step):
            e = min(seen, s + step)
            post = posts[s:e].to(dev, copy=True)  # (T, Hkv, D) on the device
            ix.extend(post)
            if s < n:
                sh.fold(pre[s:min(n, e)].to(dev), post[:min(n, e) - s])
        self._mark_outliers(layer, 0, n)

    def _finish_fit(self, total: int) -> None:
        """After the last layer's fit on the tokens before step `total`: decode steps may replay; outlier keys and
        the disk spill follow. fit_at counts the step's token too: a rollback that removes it refits, so the
        result equals a fresh prefill of the new tokens (which fits on all of them)."""
        self.fitted, self.fit_at, self._fold_starts = True, total, []
        self._n["fits"] += 1
        self._keep_outlier_keys(total)
        self._spill_to_disk(total)

    # ---- attention ----------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Prefill (T > 1) and dense steps: exact. Otherwise sparse over sinks, window, open chunk and picks."""
        if self.staging is not None:
            return self._attend_staged(layer, q)
        total = self.seq_len + q.shape[0]
        if q.shape[0] > 1 or (not capturing() and self._plan(total).dense):
            if layer == 0 and q.shape[0] == 1:
                self._n["dense_steps"] += 1
            return self._attend_exact(layer, q, total)
        if not self.fitted:  # the first sparse step fits every layer in turn (fitted is set after the last)
            self._fit(layer, total)
        if layer == 0:
            self._n["sparse_steps"] += 1
            if self.disk_chunks is not None and not capturing():
                self.disk_chunks.begin_step()
                self._disk_step_ran = True
        return self._attend_sparse(layer, q)

    def _plan(self, total: int):
        return plan_step(total, self.config)

    def _attend_exact(self, layer: int, q: torch.Tensor, total: int) -> torch.Tensor:
        """Exact attention over every stored token (the disk region read back from disk, span by span)."""
        return self._exact_over(q, total, lambda s, e: self.read_kv(layer, s, e), self.disk_chunks is None)

    def _exact_over(self, q: torch.Tensor, total: int, read, whole_ok: bool,
                    span: int | None = None) -> torch.Tensor:
        """Causal attention of q, the last T of `total` tokens, over keys [0, total) that read(start, end) returns
        as (k, v) (T, Hkv, D) on the device; short contexts in one call when whole_ok, else the earlier keys in
        spans of `span` (default EXACT_SPAN) merged by log-sum-exp, then the T tokens' own causal block."""
        t, span = q.shape[0], span or EXACT_SPAN
        if whole_ok and (t == 1 or total <= EXACT_SPAN):
            return causal_attention(q, *read(0, total))
        acc, start = OnlineSoftmax(q, self.hkv), total - t
        for s in range(0, start, span):
            acc.add_span(*read(s, min(start, s + span)))
        acc.add_span(*read(start, total), causal=True)
        return acc.result()

    def rank_chunks(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's best candidate chunks for query q (1, Hq, D) under this step's plan (made by layer 0's sparse
        attention of the step): (chunk ids, scores), each (Hkv, K). Does not mutate; graph-safe."""
        total, _, window_start, *_ = self.step_plan
        ix = self.index[layer]
        return chunk_topk(ix.project_query(q[0]), ix.coeffs, total, window_start, self.max_picks, self.chunk,
                          1.0 / math.sqrt(self.d), self.sink_chunks, self.sp.reduce, row_scale=ix.row_scale)

    def _attend_sparse(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """q (1, Hq, D) -> (1, Hq, D). Graph-safe: fixed shapes, no host sync."""
        c = self.chunk
        if layer == 0:  # the plan and the fixed entries are the same in every layer: once per step
            self.step_plan = plan_on_device(self.pos + 1, c, self.sink_chunks, self.window_chunks,
                                            self.config.token_budget, self.config.budget_floor_tokens)
        total, sealed, window_start, picks, fixed_ids, fixed_len = self.step_plan
        top, score = self.rank_chunks(layer, q)  # (Hkv, K)
        slots, lengths, cids = sparse_entries(top, score, picks, self.covered_chunks, self.outlier[layer],
                                              fixed_ids, fixed_len, c, self.n_chunks, self.read_counts,
                                              (self.res.start, self.n_chunks))
        if self.disk_chunks is not None:
            slots, lengths = self._disk_rows(layer, slots, lengths, fixed_ids.shape[0])
        if self.track_repeats:
            self._count_repeats(layer, top, lengths[:, fixed_ids.shape[0]:] > 0)
        cache = None
        if self.chunk_cache:
            f = fixed_ids.shape[0]
            if self.prefetch is not None:
                self.prefetch.join()
                self.prefetch.score(layer, top, lengths[:, f:] > 0)
            csrc = chunk_cache_assign(top, self.off_gpu(top, lengths[:, f:]), cids[:, f:], self.cached_ids[layer],
                                      self.cache_counts)
            rows = top if self.disk_chunks is None else slots[:, f:]  # pool rows of picks (on disk: their slot)
            chunk_cache_fill(rows, cids[:, f:], csrc, self.k_host[layer], self.v_host[layer], self.k_cache[layer],
                             self.v_cache[layer])
            cache = (self.k_cache[layer], self.v_cache[layer], csrc)
        sh, (k_res, v_res) = self.shadows[layer], self.res.chunks(layer)
        out, _ = shadow_paged_attention(q[0], sh.coeffs, sh.basis, self.rope.cos, self.rope.sin,
                                        self.k_host[layer], self.v_host[layer], slots, lengths, cids, cache=cache,
                                        v_resident=v_res, resident_from=self.res.start - self.row_shift // c,
                                        k_resident=k_res)
        return out[None]  # (1, Hq, D)

    def off_gpu(self, top: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pick lengths with the picks in resident chunks zeroed: those the chunk cache must hold (or fetch)."""
        return torch.where(top >= self.res.start, 0, lengths) if self.res.n else lengths

    @property
    def prefetches_picks(self) -> bool:
        return self.prefetch is not None

    def predicted_query(self, layer: int, make_q) -> None:
        """Prefetch `layer`'s likely picks (tierkv/kv/sparse/predict.py) for the query make_q() returns, on a captured
        side stream inside a graph; nothing without prefetch, before the fit or in a dense step."""
        if self.prefetch is None or not self.fitted or (not capturing() and self._plan(self.seq_len + 1).dense):
            return
        self.prefetch.fork(capturing())
        with torch.cuda.stream(self.prefetch.stream()) if self.device.type == "cuda" else contextlib.nullcontext():
            self.prefetch.issue(layer, make_q())

    def _count_repeats(self, layer: int, top: torch.Tensor, picked: torch.Tensor) -> None:
        """Add this step's picks (Hkv, K) and how many of them the layer picked last step. Graph-safe."""
        cur = torch.where(picked, top, -1)
        hit = (cur.unsqueeze(-1) == self._last_top[layer].unsqueeze(-2)).any(-1) & picked  # (Hkv, K)
        self._repeats += torch.stack([hit.sum(), picked.sum()])
        self._last_top[layer].copy_(cur)

    # ---- steps and bookkeeping ------------------------------------------------------------------------
    def needs_eager(self) -> bool:
        """Whether the next decode step makes host decisions (fit, fold, a dense step) and so cannot replay."""
        total = self.seq_len + 1
        if not self.fitted or self._plan(total).dense or total > self.capacity:
            return True
        return self._fold_due(total, self.covered)

    def advance(self, n: int) -> None:
        self.seq_len += n
        self.pos.add_(n)
        if self._disk_step_ran and not capturing():  # an eager sparse step with a disk tier: book its picks
            self._disk_step_ran = False
            self._book_disk_picks(replayed=False)

    def stats(self) -> dict:
        """Step counts, shadow, index and chunk-cache bytes on the device, host pool bytes; `total` holds the bytes
        sparse steps read over the host link and where picks came from (the chunk cache or the host)."""
        gpu = self._device_bytes() + self.res.nbytes
        extra = {}
        if self.track_repeats:
            rep, total = self._repeats.tolist()
            extra = {"picks": total, "picks_repeated": rep, "repeat_rate": rep / total if total else None}
        fixed_tok, picks, exact_picks, res_picks, res_fixed, res_exact = self.read_counts.tolist()
        if self.res.k is None:  # resident values only: exact keys still cross the link
            res_exact = 0
        hit, link_picks, link_keys = 0, picks - res_picks, exact_picks - res_exact  # picks whose V / K cross the link
        if self.chunk_cache:  # only misses cross the link, into the cache; resident picks never enter it
            link_keys, hit, _ = self.cache_counts.tolist()
            link_picks -= hit
            extra["chunk_cache"] = {"slots_per_head": self.max_picks, "hits": hit, "picks": picks,
                                    "hit_rate": hit / picks if picks else None}
        # K and V of the fixed entries not resident, V of picks not on the GPU, K of those with exact keys; read by
        # GPU loads from mapped pinned memory (attention, cache fill): no copy, no host-side wait
        fixed_res_k = res_fixed if self.res.k is not None else 0
        host_tok = 2 * fixed_tok - res_fixed - fixed_res_k + self.chunk * (link_picks + link_keys)
        link = host_tok * self.d * self.dtype.itemsize
        if self.prefetch is not None:  # predicted chunks copied ahead, right or wrong
            extra["prefetch"] = self.prefetch.stats(self.chunk * self.d * self.dtype.itemsize)
            link += extra["prefetch"]["bytes"]
        disk = self.disk_chunks.stats() if self.disk_chunks is not None else None
        missed = disk["missed"] if disk else 0  # picks whose chunk was read from disk first
        extra["total"] = {"bytes_moved": {"host->device": link},
                          "hits": {"gpu_chunk_cache": hit, "gpu_resident": res_picks,
                                   "host": picks - hit - res_picks - missed},
                          "reads": "by GPU kernels from mapped pinned host memory"}
        if disk:
            extra["total"]["bytes_moved"]["disk->host"] = disk["disk_read_bytes"]
            extra["total"]["hits"]["disk"] = missed
            extra["total"]["io_wait_s"] = disk["miss_wait_s"]
            extra["disk_tier"] = disk
        extra["resident_values"] = {"chunks": self.res.n, "of": self.n_chunks, "keys_too": self.res.k is not None,
                                    "hit_rate": res_picks / picks if picks else None}
        return {**super().stats(), **self._n, **extra,
                "token_budget": self.config.token_budget, "budget_floor_tokens": self.config.budget_floor_tokens,
                "budget_tokens": self.config.budget_tokens(self.seq_len), "max_picks": self.max_picks,
                "covered": self.covered,
                "outlier_chunks": int(self.outlier.sum()) if self.fitted else 0,
                "gpu_bytes": gpu, "gpu": format_size(gpu), "host_bytes": self.host_bytes,
                "host": format_size(self.host_bytes)}

    def reset_stats(self) -> None:
        """Zero the step and read counters (in place: a captured graph adds to them). Mutates."""
        self._n = dict.fromkeys(self._n, 0)
        self.read_counts.zero_()
        if self.chunk_cache:
            self.cache_counts.zero_()

    def placement_bytes(self) -> dict[str, int]:
        """Device: shadows, index, ring and resident copies; host: the pinned pool; disk: the chunks on disk."""
        return {"device": self._device_bytes() + self.res.nbytes, "host": self.host_bytes,
                "disk": self.disk_chunks.store.nbytes if self.disk_chunks is not None else 0}

    def budget_bytes(self) -> dict[str, int | None]:
        """kv_gpu_budget bounds the device bytes (resident copies fill what the rest leaves), cpu_budget the pool."""
        return {"device": self.config.kv_gpu_budget, "host": self.config.cpu_budget, "disk": None}

    def close(self) -> None:
        if self.disk_chunks is not None:
            self.disk_chunks.close()
            self.disk_chunks = None
        self._host, self._pins = [], []
        self._k_pool = self._v_pool = torch.empty(0)
        self._fit_buf = [[] for _ in range(self.num_layers)]
        self._pool_pre = [0] * self.num_layers
