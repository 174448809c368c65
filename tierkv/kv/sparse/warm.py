"""Compile at load the decode kernels whose Triton specialisation depends on the capacity class: the chunk top-k
(block and top-k widths, integer divisibility), the entry list and the split merge. Without this, the first call
in a class that load's short warm-up call did not reach compiles them inside its graph capture (2.7 s at 32K on an
H100 with an empty Triton cache, bench/results/first-call-llama8b-32k-h100-2026-12-05-s11.json). Each class runs
the calls of SparseKVCache._attend_sparse once on synthetic inputs of its shapes; CUDA only (Triton)."""

from __future__ import annotations

import math

import torch

from tierkv.config import TierConfig
from tierkv.kernels import chunk_topk, sparse_entries
from tierkv.kv.sparse.index import LowRankIndex
from tierkv.kv.sparse.options import SparseOptions
from tierkv.kv.sparse.select import class_sizes, plan_on_device
from tierkv.models.config import ModelConfig


def warm_class(cfg: ModelConfig, tier: TierConfig, capacity: int, device: torch.device, dtype: torch.dtype,
               sparse: SparseOptions | None = None) -> torch.Tensor:
    """One sparse step's selection, entry list and (on CUDA) split merge for a SparseKVCache of `capacity`
    positions. Returns the entry slots (Hkv, fixed + picks)."""
    sp = sparse or SparseOptions()
    hkv, d = cfg.num_kv_heads, cfg.head_dim
    c, n_chunks, max_picks, sinks, window = sizes = class_sizes(tier, capacity)
    cap = sizes.capacity
    ix = LowRankIndex(hkv, d, sp.score_rank or tier.score_rank, c, shared=False, reduce=sp.reduce, device=device,
                      dtype=dtype)
    ix.reserve(cap)
    ix.fit_grams(torch.eye(d, device=device).expand(hkv, d, d).contiguous())
    total = torch.full((1,), cap // 2, dtype=torch.long, device=device)
    plan = plan_on_device(total, c, sinks, window, tier.token_budget, tier.budget_floor_tokens)
    _, _, window_start, picks, fixed_ids, fixed_len = plan
    q = torch.zeros((cfg.num_heads, d), device=device, dtype=dtype)
    top, score = chunk_topk(ix.project_query(q), ix.coeffs, total, window_start, max_picks, c, 1.0 / math.sqrt(d),
                            sinks, sp.reduce, row_scale=ix.row_scale)
    counts = torch.zeros(6, dtype=torch.long, device=device)
    slots, _, _ = sparse_entries(top, score, picks, torch.zeros(1, dtype=torch.long, device=device),
                                 torch.zeros(n_chunks, dtype=torch.bool, device=device), fixed_ids, fixed_len, c,
                                 n_chunks, counts, (0, n_chunks))
    block_n = None
    if device.type == "cuda":
        from tierkv.kernels.shadow_attention_triton import shadow_block_n

        block_n = shadow_block_n(q, dtype, tier.rank)
    if block_n:  # else the torch reference attends: no merge to compile
        from tierkv.kernels.decode_attention_triton import merge_splits, plan_splits

        _, _, po, pl = plan_splits(q, hkv, slots.shape[1] * c, block_n, None)
        merge_splits(po.zero_(), pl.zero_(), dtype)
    return slots


def warm_classes(cfg: ModelConfig, tier: TierConfig, classes: list[int], device: torch.device,
                 dtype: torch.dtype) -> None:
    """warm_class for each capacity in `classes` (kv/factory.capacity_classes), then wait for the GPU."""
    for cap in classes:
        warm_class(cfg, tier, cap, device, dtype)
    torch.cuda.synchronize(device)
