"""Slot assignment for the GPU chunk cache of a sparse decode step.

Each KV head keeps `S` cache slots holding chunks it picked in earlier steps (selections change slowly, so most
picks repeat). A pick already cached is a hit and is read from its slot; a miss is given a slot whose chunk was
not picked this step, and the attention kernel that reads the miss over the host link also writes it there
(write-through), so the chunk crosses the link once. Slot S (one past the last) is scratch, never assigned.

Torch reference `chunk_cache_assign_torch`; the Triton twin (chunk_cache_triton.py) does it in one launch.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch

NOT_CACHED = -1  # csrc value of an entry read from the host only


def decode_csrc(csrc: torch.Tensor, scratch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hit, miss, slot) from csrc: slot >= 0 is a hit there, -(slot + 2) a miss to write there, -1 neither.
    slot is `scratch` where the entry is neither."""
    hit, miss = csrc >= 0, csrc <= -2
    slot = torch.where(hit, csrc, torch.where(miss, -csrc - 2, scratch))
    return hit, miss, slot


def chunk_cache_assign_torch(top: torch.Tensor, pick_len: torch.Tensor, cached: torch.Tensor,
                             counts: torch.Tensor) -> torch.Tensor:
    """Match this step's picks with the cache; returns csrc (Hkv, K) int64 and updates `cached` in place.

    top: (Hkv, K) picked chunk ids; pick_len: (Hkv, K) tokens attended per pick (0: not attended, not cached).
    cached: (Hkv, S) int64 chunk id held by each slot (-1: empty), S >= K. counts: (4,) int64; [2] += hits,
    [3] += attended picks. csrc per pick: slot >= 0 (hit), -(slot + 2) (miss, to be written into slot), -1
    (not attended). Misses take, in rank order, the free slots (those holding no chunk picked now) in slot
    order; a free slot not taken keeps its chunk, which may be picked again later. No host sync.
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
    counts[2:].add_(torch.stack([hit.sum(), picked.sum()]))
    return csrc


def chunk_cache_assign(top, pick_len, cached, counts, *, impl=None):
    """Dispatching entry point: see `chunk_cache_assign_torch`."""
    fn = dispatch.get("chunk_cache_assign", top.device, impl, module="chunk_cache")
    return fn(top, pick_len, cached, counts)
