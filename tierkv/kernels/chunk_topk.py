"""Chunk selection from low-rank key scores: per-token scores, reduced per chunk, top-k chunks per KV head.

Score of token t for query head g: scale * q_low[h, g] . A[t] (A shared (S, r) or per KV head (Hkv, S, r)),
times row_scale[t] when A is stored quantised (int8 rows with one fp32 scale each, shaped like A less its r).
reduce="mass" (default): log of the chunk's share of the head's softmax mass, sum over the chunk's tokens,
then the max over the query group; "group-mass": the same shares summed over the query group (the chunk's values
serve every head of the group; measured best on SmolLM2); "max": the chunk's best token score, max over the group.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch

REDUCES = ("mass", "group-mass", "max")


def coeff_views(q_low: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """Per-head view (Hkv, S, r) of A, with head stride 0 when A is shared (no copy)."""
    return coeffs.unsqueeze(0).expand(q_low.shape[0], -1, -1) if coeffs.dim() == 2 else coeffs


def scale_views(q_low: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """Per-head view (Hkv, S) of the row scales, with head stride 0 when they are shared (S,) (no copy)."""
    return row_scale.unsqueeze(0).expand(q_low.shape[0], -1) if row_scale.dim() == 1 else row_scale


def chunk_scores_torch(
    q_low: torch.Tensor, coeffs: torch.Tensor, n_tokens: torch.Tensor | int, chunk_size: int, scale: float, reduce: str,
    *, row_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-chunk reduced scores (Hkv, G, C) fp32 with C = ceil(S / chunk_size); tokens >= n_tokens are ignored.

    "mass" gives the chunk's log-sum-exp of token scores, "max" its max; -inf for a chunk with no valid token.
    row_scale: (S,) or (Hkv, S) scales of quantised rows of A (scores are computed in fp32 from the int8 values).
    """
    hkv, g, _ = q_low.shape
    a3 = coeff_views(q_low, coeffs)  # (Hkv, S, r)
    s_cap = a3.shape[1]
    c = -(-s_cap // chunk_size)
    s = torch.bmm(q_low.float(), a3.float().transpose(1, 2))  # (Hkv, G, S)
    if row_scale is not None:
        s = s * scale_views(q_low, row_scale).float().unsqueeze(1)  # (Hkv, 1, S)
    s = s * scale
    keep = torch.arange(s_cap, device=s.device) < n_tokens  # (S,)
    s = s.masked_fill(~keep, float("-inf"))
    s = torch.nn.functional.pad(s, (0, c * chunk_size - s_cap), value=float("-inf")).view(hkv, g, c, chunk_size)
    return s.amax(dim=-1) if reduce == "max" else torch.logsumexp(s, dim=-1)  # (Hkv, G, C)


def topk_lower_id_first(best: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(best, k) along the last dim, best first, with a fixed tie rule: of equal scores the lower index
    comes first and wins the last place (-0.0 counts as 0.0). Exact: the keys are int64 with the fp32 score as an
    order-preserving int32 in the high half and the reversed index in the low half, so no two keys tie.
    Returns (ids int64, scores fp32); does not mutate best."""
    best = best.float() + 0.0  # -0.0 -> 0.0, its tie
    bits = best.view(torch.int32)
    ids = torch.arange(best.shape[-1], device=best.device)
    key = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)).long() << 32) | (0x7FFFFFFF - ids)  # (..., C)
    top = torch.topk(key, k, dim=-1).indices
    return top, best.gather(-1, top)


def select_top_chunks(
    red: torch.Tensor, select_end: torch.Tensor | int, k: int, first: int, reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shared tail: normalise (mass), reduce over the query group, mask chunks outside [first, select_end), top-k.

    red: (Hkv, G, C) from a chunk-scores kernel. Returns ids (Hkv, k) int64 and their scores (Hkv, k) fp32,
    best first, ties to the lower chunk id; a score of -inf marks a pick that is not eligible (fewer than k
    eligible chunks).
    """
    c = red.shape[-1]
    if not 0 < k <= c:
        raise ValueError(f"chunk_topk: k={k} must be in 1..{c} (the chunk count)")
    if reduce != "max":
        total = torch.logsumexp(red, dim=-1, keepdim=True)  # (Hkv, G, 1)
        red = red - torch.where(torch.isinf(total), torch.zeros_like(total), total)
    best = torch.logsumexp(red, dim=1) if reduce == "group-mass" else red.amax(dim=1)  # (Hkv, C)
    ids = torch.arange(c, device=red.device)
    eligible = (ids >= first) & (ids < select_end)  # (C,)
    best = best.masked_fill(~eligible, float("-inf"))
    return topk_lower_id_first(best, k)  # (Hkv, k) each


def _check(q_low: torch.Tensor, coeffs: torch.Tensor, reduce: str, row_scale: torch.Tensor | None = None) -> None:
    if reduce not in REDUCES:
        raise ValueError(f"chunk_topk: reduce={reduce!r} must be one of {REDUCES}")
    if q_low.dim() != 3 or q_low.shape[-1] != coeffs.shape[-1] or (coeffs.dim() == 3 and coeffs.shape[0] != q_low.shape[0]):
        raise ValueError(f"chunk_topk: q_low {tuple(q_low.shape)} does not match coeffs {tuple(coeffs.shape)}")
    if row_scale is None and coeffs.dtype == torch.int8:
        raise ValueError("chunk_topk: int8 coeffs need their row_scale")
    if row_scale is not None and row_scale.shape != coeffs.shape[:-1]:
        raise ValueError(f"chunk_topk: row_scale {tuple(row_scale.shape)} does not match coeffs {tuple(coeffs.shape)}")


def chunk_topk_torch(
    q_low: torch.Tensor,
    coeffs: torch.Tensor,
    n_tokens: torch.Tensor | int,
    select_end: torch.Tensor | int,
    k: int,
    chunk_size: int,
    scale: float,
    first: int = 0,
    reduce: str = "mass",
    *,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k chunk ids per KV head, on the device, no host sync.

    q_low: (Hkv, G, r) queries in the low-rank space, grouped by KV head. coeffs: A (S, r) shared or (Hkv, S, r).
    row_scale: None for A as it is, or the fp32 scales (S,) / (Hkv, S) of int8 rows of A (A[t] = row_scale[t] * int8).
    n_tokens: tokens with coefficients (int or 0-d device tensor; later tokens are ignored). Chunks eligible
    for picking: first <= c < select_end (sinks below `first`, window and unsealed chunks from select_end on;
    their tokens still count in the mass normalisation). Returns ids (Hkv, k) int64, scores (Hkv, k) fp32.
    """
    _check(q_low, coeffs, reduce, row_scale)
    red = chunk_scores_torch(q_low, coeffs, n_tokens, chunk_size, scale, reduce, row_scale=row_scale)
    return select_top_chunks(red, select_end, k, first, reduce)


def chunk_topk(q_low, coeffs, n_tokens, select_end, k, chunk_size, scale, first=0, reduce="mass", *, row_scale=None,
               impl=None):
    """Dispatching entry point: see `chunk_topk_torch`."""
    fn = dispatch.get("chunk_topk", q_low.device, impl)
    return fn(q_low, coeffs, n_tokens, select_end, k, chunk_size, scale, first, reduce, row_scale=row_scale)
