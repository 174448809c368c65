"""The attention entries of one sparse decode step per KV head: fixed chunks (sinks, window, open chunk) and
the picked chunks, as (pool slot, valid tokens, shadow chunk id or -1 for exact keys) lists.

Torch reference `sparse_entries_torch`; the Triton twin (sparse_entries_triton.py) builds them in one launch.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch


def sparse_entries_torch(
    top: torch.Tensor,
    score: torch.Tensor,
    picks: torch.Tensor,
    covered: torch.Tensor,
    outlier: torch.Tensor,
    fixed_ids: torch.Tensor,
    fixed_len: torch.Tensor,
    chunk: int,
    n_chunks: int,
    counts: torch.Tensor | None = None,
    resident: tuple[int, int] = (0, 0),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entries (Hkv, F + K): the F fixed chunks for every head, then each head's K ranked picks.

    top/score: (Hkv, K) ranked chunk ids and scores (-inf: not eligible). picks, covered: (1,) int64, how many
    picks count this step and how many chunks the shadow covers. outlier: (N,) bool. fixed_ids/fixed_len: (F,).
    A pick is attended when its rank < picks and its score is finite; its keys are rebuilt (chunk id kept in
    cids) when covered and not an outlier, else read exact (-1). Returns slots (ids clamped to the pool),
    lengths and cids, all int64. counts: None or (6,) int64, += [fixed tokens over all heads, attended picks, picks
    with exact keys, attended picks in resident slots, fixed tokens in resident slots, picks with exact keys in
    resident slots] (what the step reads beyond the shadow, and which of it a GPU-resident copy of the chunks in
    [resident[0], resident[1]) serves).
    No host sync.
    """
    hkv, k = top.shape
    rank = torch.arange(k, device=top.device)
    picked = (rank < picks) & torch.isfinite(score)  # (Hkv, K)
    rebuild = picked & (top < covered) & ~outlier[top]
    ids = torch.cat([fixed_ids.expand(hkv, -1), top], dim=1)  # (Hkv, F + K)
    lengths = torch.cat([fixed_len.expand(hkv, -1), torch.where(picked, chunk, 0)], dim=1)
    cids = torch.cat([torch.full((hkv, fixed_ids.shape[0]), -1, device=top.device, dtype=top.dtype),
                      torch.where(rebuild, top, -1)], dim=1)
    slots = ids.clamp(0, n_chunks - 1)
    if counts is not None:
        f = fixed_ids.shape[0]
        on_gpu = (slots >= resident[0]) & (slots < resident[1])
        fixed_res = torch.where(on_gpu[:, :f], lengths[:, :f], 0).sum()
        counts.add_(torch.stack([fixed_len.sum() * hkv, picked.sum(), (picked & ~rebuild).sum(),
                                 (picked & on_gpu[:, f:]).sum(), fixed_res, (picked & ~rebuild & on_gpu[:, f:]).sum()]))
    return slots, lengths, cids


def sparse_entries(top, score, picks, covered, outlier, fixed_ids, fixed_len, chunk, n_chunks, counts=None,
                   resident=(0, 0), *, impl=None):
    """Dispatching entry point: see `sparse_entries_torch`."""
    fn = dispatch.get("sparse_entries", top.device, impl)
    return fn(top, score, picks, covered, outlier, fixed_ids, fixed_len, chunk, n_chunks, counts, resident)
