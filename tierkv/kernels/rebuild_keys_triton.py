"""Fused Triton twin of `rebuild_keys_torch`: gather A rows, multiply by B, apply RoPE, store keys.

One program per (KV head, block of picked tokens); B's two halves are multiplied separately so that
rotate-half needs no register shuffle. Imported only by the dispatcher (needs triton).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierkv.kernels.rebuild_keys import shadow_views


@triton.jit
def _rebuild_keys_kernel(
    a_ptr, b_ptr, idx_ptr, pos_ptr, cos_ptr, sin_ptr, out_ptr,
    n, rank,
    s_ah, s_at, s_ar, s_bh, s_br, s_bd, s_ih, s_in, s_ph, s_pn, s_ct, s_st, s_on, s_oh,
    HALF: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    h = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n
    tok = tl.load(idx_ptr + h * s_ih + offs_n * s_in, mask=mask_n, other=0).to(tl.int64)
    pos = tl.load(pos_ptr + h * s_ph + offs_n * s_pn, mask=mask_n, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    a = tl.load(a_ptr + h * s_ah + tok[:, None] * s_at + offs_r[None, :] * s_ar,
                mask=mask_n[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_R)
    offs_d = tl.arange(0, HALF)
    b_base = b_ptr + h * s_bh + offs_r[:, None] * s_br
    b_lo = tl.load(b_base + offs_d[None, :] * s_bd, mask=mask_r[:, None], other=0.0).to(tl.float32)  # (BLOCK_R, HALF)
    b_hi = tl.load(b_base + (offs_d[None, :] + HALF) * s_bd, mask=mask_r[:, None], other=0.0).to(tl.float32)
    # fp32 products as the reference; the op is tiny next to the attention it feeds
    lo = tl.dot(a, b_lo, input_precision="ieee")  # (BLOCK_N, HALF) fp32
    hi = tl.dot(a, b_hi, input_precision="ieee")
    c_row = cos_ptr + pos[:, None] * s_ct + offs_d[None, :]
    s_row = sin_ptr + pos[:, None] * s_st + offs_d[None, :]
    m2 = mask_n[:, None]
    c_lo = tl.load(c_row, mask=m2, other=0.0).to(tl.float32)
    c_hi = tl.load(c_row + HALF, mask=m2, other=0.0).to(tl.float32)
    s_lo = tl.load(s_row, mask=m2, other=0.0).to(tl.float32)
    s_hi = tl.load(s_row + HALF, mask=m2, other=0.0).to(tl.float32)
    out_lo = lo * c_lo - hi * s_lo
    out_hi = hi * c_hi + lo * s_hi
    o_row = out_ptr + offs_n[:, None] * s_on + h * s_oh + offs_d[None, :]
    tl.store(o_row, out_lo.to(out_ptr.dtype.element_ty), mask=m2)
    tl.store(o_row + HALF, out_hi.to(out_ptr.dtype.element_ty), mask=m2)


def rebuild_keys_triton(
    coeffs: torch.Tensor,
    basis: torch.Tensor,
    idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Same contract as `rebuild_keys_torch`; D must be a power of two >= 32. One launch, no host sync."""
    head_dim = cos.shape[-1]
    if head_dim < 32 or head_dim & (head_dim - 1) or coeffs.dtype != basis.dtype:
        raise ValueError(f"rebuild_keys_triton needs D a power of two >= 32 (got {head_dim}) and A, B of one dtype")
    a3, b3, idx2 = shadow_views(coeffs, basis, idx, head_dim)
    hkv, rank = b3.shape[0], b3.shape[1]
    pos = idx2 if positions is None else (positions.expand(hkv, -1) if positions.dim() == 1 else positions)
    cos, sin = cos.contiguous(), sin.contiguous()
    n = idx2.shape[1]
    out = torch.empty((n, hkv, head_dim), device=idx.device, dtype=out_dtype or basis.dtype)  # (n, Hkv, D)
    block_n = 32
    grid = (hkv, triton.cdiv(n, block_n))
    _rebuild_keys_kernel[grid](
        a3, b3, idx2, pos, cos, sin, out, n, rank,
        a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
        idx2.stride(0), idx2.stride(1), pos.stride(0), pos.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1),
        HALF=head_dim // 2, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
    )
    return out
