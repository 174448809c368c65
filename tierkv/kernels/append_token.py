"""One decode token's writes for one layer of the sparse graph cache, as one op: K and V into the pool at the
device position, V (and K, when kept) into the GPU-resident copy, the pre-RoPE key into the ring, and the key's low-rank index
row (int8 with a per-row scale) at the position. Unfused these are ~14 small kernels per layer and token.

Torch reference `append_token_torch`; the Triton twin (append_token_triton.py) does it in one launch.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch


def quantize_rows(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per row of a (..., r): (a_int8 (..., r), scale (...) fp32) with a ~= a_int8 * scale[..., None]
    and |error| <= scale / 2 per element; a zero row gets scale 1. Does not mutate; no host sync."""
    a = a.float()
    scale = a.abs().amax(-1) / 127  # (...)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero (or underflowing) rows: a_int8 = 0
    return torch.round(a / scale.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8), scale


def append_token_torch(
    k: torch.Tensor,
    v: torch.Tensor,
    k_pre: torch.Tensor,
    at: torch.Tensor,
    pool_at: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    k_res: torch.Tensor | None,
    v_res: torch.Tensor,
    res_at: torch.Tensor,
    ring: torch.Tensor,
    ring_at: torch.Tensor,
    basis: torch.Tensor,
    coeffs: torch.Tensor,
    row_scale: torch.Tensor,
) -> None:
    """Writes one token (k, v, k_pre: (1, Hkv, D)); at (its position), pool_at, res_at, ring_at: (1,) int64 rows.

    k_pool, v_pool: (rows, Hkv, D) rows at `pool_at` (the position, or less where the pool is compacted); k_res (or None), v_res: (rows, Hkv, D) row res_at; ring: (ring, Hkv, D) row
    ring_at; the index: basis (Hkv, r, D), coeffs (Hkv, S_cap, r) int8 and row_scale (Hkv, S_cap) fp32 at `at`,
    from the fp32 projection of k on the basis. Mutates the buffers; graph-safe (no host sync).
    """
    k_pool.index_copy_(0, pool_at, k)
    v_pool.index_copy_(0, pool_at, v)
    v_res.index_copy_(0, res_at, v)
    if k_res is not None:
        k_res.index_copy_(0, res_at, k)
    ring.index_copy_(0, ring_at, k_pre)
    a = torch.bmm(k[0].unsqueeze(1).float(), basis.float().transpose(1, 2))  # (Hkv, 1, r)
    qa, sa = quantize_rows(a)  # (Hkv, 1, r) int8, (Hkv, 1) fp32
    coeffs.index_copy_(1, at, qa)
    row_scale.index_copy_(1, at, sa)


def append_token(k, v, k_pre, at, pool_at, k_pool, v_pool, k_res, v_res, res_at, ring, ring_at, basis, coeffs,
                 row_scale, *, impl=None):
    """Dispatching entry point: see `append_token_torch`."""
    fn = dispatch.get("append_token", k.device, impl)
    return fn(k, v, k_pre, at, pool_at, k_pool, v_pool, k_res, v_res, res_at, ring, ring_at, basis, coeffs, row_scale)
