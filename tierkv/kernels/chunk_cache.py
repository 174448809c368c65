"""The GPU chunk cache of a sparse decode step: slot assignment and the fill of missed chunks.

Each KV head keeps `S` cache slots holding chunks it picked in earlier steps (selections change slowly, so most
picks repeat). A pick already cached is a hit, read from its slot; a miss is given a slot whose chunk was not
picked this step and is copied there from the host pools (`chunk_cache_fill`) before attention reads every pick
from the cache. Slot S (one past the last) is scratch, never assigned.

Torch references `chunk_cache_assign_torch`, `chunk_cache_fill_torch`; Triton twins in chunk_cache_triton.py.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch

NOT_CACHED = -1  # csrc value of a pick that is not attended (or found no slot): read from the host if at all


def cache_slots(csrc: torch.Tensor, scratch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(slot, miss) from csrc: slot >= 0 is a hit there, -(slot + 2) a miss filled there; scratch elsewhere."""
    miss = csrc <= -2
    return torch.where(csrc >= 0, csrc, torch.where(miss, -csrc - 2, scratch)), miss


def chunk_cache_assign_torch(top: torch.Tensor, pick_len: torch.Tensor, pick_cids: torch.Tensor,
                             cached: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Match this step's picks with the cache; returns csrc (Hkv, K) int64 and updates `cached` in place.

    top: (Hkv, K) picked chunk ids; pick_len: (Hkv, K) tokens attended per pick (0: not attended, not cached);
    pick_cids: (Hkv, K) shadow chunk id of each pick, < 0 where its keys are read exact. cached: (Hkv, S) int64
    chunk id held by each slot (-1: empty), S >= K. counts: (3,) int64; [0] += misses with exact keys, [1] += hits,
    [2] += attended picks. csrc per pick: slot >= 0 (hit), -(slot + 2) (miss, to fill into slot), -1 (not
    attended). Misses take, in rank order, the free slots (those holding no chunk picked now) in slot order; a
    free slot not taken keeps its chunk, which may be picked again later. No host sync.
    """
    s = cached.shape[1]
    slot_ids = torch.arange(s, device=top.device)
    picked = pick_len > 0
    match = picked.unsqueeze(2) & (top.unsqueeze(2) == cached.unsqueeze(1)) & (cached.unsqueeze(1) >= 0)  # (H, K, S)
    hit = match.any(2)
    hit_slot = (match * slot_ids).sum(2)
    free = ~match.any(1)  # (H, S)
    miss = picked & ~hit
    miss_rank = miss.long().cumsum(1) - 1
    free_rank = free.long().cumsum(1) - 1
    assign = miss.unsqueeze(2) & free.unsqueeze(1) & (miss_rank.unsqueeze(2) == free_rank.unsqueeze(1))  # (H, K, S)
    has_slot = assign.any(2)
    miss_slot = (assign * slot_ids).sum(2)
    csrc = torch.where(hit, hit_slot, torch.where(miss & has_slot, -miss_slot - 2, NOT_CACHED))
    taken = assign.any(1)
    cached.copy_(torch.where(taken, (assign * top.unsqueeze(2)).sum(1), cached))
    counts.add_(torch.stack([(miss & has_slot & (pick_cids < 0)).sum(), hit.sum(), picked.sum()]))
    return csrc


def chunk_cache_fill_torch(top: torch.Tensor, pick_cids: torch.Tensor, csrc: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Copy each missed pick's values (and keys, where read exact) from the pools (N, chunk, Hkv, D) into its slot
    of the caches (S + 1, chunk, Hkv, D). Mutates the caches only. No host sync."""
    hkv = top.shape[0]
    scratch = k_cache.shape[0] - 1
    slot, miss = cache_slots(csrc, scratch)
    heads = torch.arange(hkv, device=top.device).unsqueeze(1)
    src = top.clamp(0, v_pool.shape[0] - 1)
    # misses are unique slots; every other pick lands in the scratch slot
    v_cache.permute(2, 0, 1, 3)[heads, torch.where(miss, slot, scratch)] = v_pool.permute(2, 0, 1, 3)[heads, src]
    k_cache.permute(2, 0, 1, 3)[heads, torch.where(miss & (pick_cids < 0), slot, scratch)] = \
        k_pool.permute(2, 0, 1, 3)[heads, src]


def chunk_cache_assign(top, pick_len, pick_cids, cached, counts, *, impl=None):
    """Dispatching entry point: see `chunk_cache_assign_torch`."""
    fn = dispatch.get("chunk_cache_assign", top.device, impl, module="chunk_cache")
    return fn(top, pick_len, pick_cids, cached, counts)


def chunk_cache_fill(top, pick_cids, csrc, k_pool, v_pool, k_cache, v_cache, *, impl=None):
    """Dispatching entry point: see `chunk_cache_fill_torch`."""
    fn = dispatch.get("chunk_cache_fill", top.device, impl, module="chunk_cache")
    return fn(top, pick_cids, csrc, k_pool, v_pool, k_cache, v_cache)
