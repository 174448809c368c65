"""Triton twins of the chunk-cache references: one program per KV head matches picks against its slots;
one program per (KV head, pick) copies a missed chunk into its slot."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _assign_kernel(top_ptr, len_ptr, cid_ptr, cached_ptr, csrc_ptr, count_ptr, k, s, s_th, s_lh, s_ih, s_ch, s_oh,
                   BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    h = tl.program_id(0)
    i = tl.arange(0, BLOCK_K)
    mk = i < k
    top = tl.load(top_ptr + h * s_th + i, mask=mk, other=-1).to(tl.int32)  # chunk ids fit 31 bits
    picked = tl.load(len_ptr + h * s_lh + i, mask=mk, other=0) > 0
    exact = tl.load(cid_ptr + h * s_ih + i, mask=mk, other=0) < 0
    sl = tl.arange(0, BLOCK_S)
    ms = sl < s
    old = tl.load(cached_ptr + h * s_ch + sl, mask=ms, other=-1).to(tl.int32)
    match = picked[:, None] & (top[:, None] == old[None, :]) & (old >= 0)[None, :] & ms[None, :]  # (BK, BS)
    hit = tl.sum(match.to(tl.int32), axis=1) > 0
    hit_slot = tl.sum(tl.where(match, sl[None, :], 0), axis=1)
    free = ms & (tl.sum(match.to(tl.int32), axis=0) == 0)
    miss = picked & ~hit
    miss_rank = tl.cumsum(miss.to(tl.int32), axis=0) - 1
    free_rank = tl.cumsum(free.to(tl.int32), axis=0) - 1
    assign = miss[:, None] & free[None, :] & (miss_rank[:, None] == free_rank[None, :])
    has_slot = tl.sum(assign.to(tl.int32), axis=1) > 0
    miss_slot = tl.sum(tl.where(assign, sl[None, :], 0), axis=1)
    csrc = tl.where(hit, hit_slot, tl.where(miss & has_slot, -miss_slot - 2, -1))
    tl.store(csrc_ptr + h * s_oh + i, csrc.to(tl.int64), mask=mk)
    taken = tl.sum(assign.to(tl.int32), axis=0) > 0
    new_id = tl.sum(tl.where(assign, top[:, None], 0), axis=0)
    tl.store(cached_ptr + h * s_ch + sl, new_id.to(tl.int64), mask=ms & taken)
    tl.atomic_add(count_ptr, tl.sum((miss & has_slot & exact).to(tl.int64)))
    tl.atomic_add(count_ptr + 1, tl.sum(hit.to(tl.int64)))
    tl.atomic_add(count_ptr + 2, tl.sum(picked.to(tl.int64)))


def chunk_cache_assign_triton(top, pick_len, pick_cids, cached, counts):
    """Same contract as `chunk_cache_assign_torch`. One launch."""
    hkv, k = top.shape
    s = cached.shape[1]
    top = top.contiguous()
    csrc = torch.empty((hkv, k), dtype=torch.int64, device=top.device)
    block = triton.next_power_of_2(max(k, s))
    _assign_kernel[(hkv,)](top, pick_len, pick_cids, cached, csrc, counts, k, s, top.stride(0), pick_len.stride(0),
                           pick_cids.stride(0), cached.stride(0), csrc.stride(0),
                           BLOCK_K=triton.next_power_of_2(k), BLOCK_S=triton.next_power_of_2(s),
                           num_warps=4 if block <= 64 else 8)
    return csrc


@triton.jit
def _fill_kernel(top_ptr, cid_ptr, csrc_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, n_chunks, s_th, s_ih, s_oh,
                 s_pn, s_pt, s_ph, s_cn, s_ct, s_ch, CHUNK: tl.constexpr, D: tl.constexpr):
    h = tl.program_id(0)
    p = tl.program_id(1)
    cs = tl.load(csrc_ptr + h * s_oh + p)
    cid = tl.load(cid_ptr + h * s_ih + p)
    src = tl.minimum(tl.maximum(tl.load(top_ptr + h * s_th + p), 0), n_chunks - 1)
    slot = tl.maximum(-cs - 2, 0)
    j = tl.arange(0, CHUNK)[:, None]
    d = tl.arange(0, D)[None, :]
    tile = j * 0 + d * 0  # masks built as tiles (scalar bools do not broadcast in the interpreter)
    m = (tile + cs) <= -2  # a miss: copy
    off_p = src * s_pn + j * s_pt + h * s_ph + d
    off_c = slot * s_cn + j * s_ct + h * s_ch + d
    tl.store(vc_ptr + off_c, tl.load(v_ptr + off_p, mask=m), mask=m)
    mk = m & ((tile + cid) < 0)  # keys read exact: copy them too
    tl.store(kc_ptr + off_c, tl.load(k_ptr + off_p, mask=mk), mask=mk)


def chunk_cache_fill_triton(top, pick_cids, csrc, k_pool, v_pool, k_cache, v_cache):
    """Same contract as `chunk_cache_fill_torch`. One launch of Hkv x K programs (hits and skips copy nothing)."""
    hkv, k = top.shape
    n, chunk, _, d = v_pool.shape
    if k_pool.stride() != v_pool.stride() or k_cache.stride() != v_cache.stride():
        raise ValueError("chunk_cache_fill_triton needs K and V pools (and caches) of one layout")
    _fill_kernel[(hkv, k)](top, pick_cids, csrc, k_pool, v_pool, k_cache, v_cache, n, top.stride(0),
                           pick_cids.stride(0), csrc.stride(0), *v_pool.stride()[:3], *v_cache.stride()[:3],
                           CHUNK=chunk, D=d)
