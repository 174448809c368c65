"""Triton twin of `chunk_cache_assign_torch`: one program per KV head matches picks against its slots."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _assign_kernel(top_ptr, len_ptr, cached_ptr, csrc_ptr, count_ptr, k, s, s_th, s_lh, s_ch, s_oh,
                   BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr):
    h = tl.program_id(0)
    i = tl.arange(0, BLOCK_K)
    mk = i < k
    top = tl.load(top_ptr + h * s_th + i, mask=mk, other=-1)
    picked = tl.load(len_ptr + h * s_lh + i, mask=mk, other=0) > 0
    sl = tl.arange(0, BLOCK_S)
    ms = sl < s
    old = tl.load(cached_ptr + h * s_ch + sl, mask=ms, other=-1)
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
    tl.atomic_add(count_ptr + 2, tl.sum(hit.to(tl.int64)))
    tl.atomic_add(count_ptr + 3, tl.sum(picked.to(tl.int64)))


def chunk_cache_assign_triton(top, pick_len, cached, counts):
    """Same contract as `chunk_cache_assign_torch`. One launch."""
    hkv, k = top.shape
    s = cached.shape[1]
    top = top.contiguous()
    csrc = torch.empty((hkv, k), dtype=torch.int64, device=top.device)
    _assign_kernel[(hkv,)](top, pick_len, cached, csrc, counts, k, s, top.stride(0), pick_len.stride(0),
                           cached.stride(0), csrc.stride(0),
                           BLOCK_K=triton.next_power_of_2(k), BLOCK_S=triton.next_power_of_2(s))
    return csrc
