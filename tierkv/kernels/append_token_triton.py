"""Triton twin of `append_token_torch`: one program per KV head does all of a token's writes for one layer."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _round_half_even(x):
    """torch.round's rounding (ties to even) with plain arithmetic, the same on every backend."""
    f = tl.floor(x)
    diff = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where((diff > 0.5) | ((diff == 0.5) & odd), f + 1.0, f)


@triton.jit
def _append_token_kernel(
    k_ptr, v_ptr, kp_ptr, at_ptr, pool_at_ptr, kpool_ptr, vpool_ptr, kres_ptr, vres_ptr, res_at_ptr, ring_ptr, ring_at_ptr,
    b_ptr, c_ptr, rs_ptr, rank,
    s_in, s_pool, s_res, s_ring, s_bh, s_br, s_ch, s_ct, s_rh,
    D: tl.constexpr, BLOCK_R: tl.constexpr, KEEP_K: tl.constexpr,
):
    h = tl.program_id(0)
    offs_d = tl.arange(0, D)
    at = tl.load(at_ptr)
    pool_at = tl.load(pool_at_ptr)
    res_at = tl.load(res_at_ptr)
    ring_at = tl.load(ring_at_ptr)
    k = tl.load(k_ptr + h * s_in + offs_d)
    v = tl.load(v_ptr + h * s_in + offs_d)
    tl.store(kpool_ptr + pool_at * s_pool + h * D + offs_d, k)
    tl.store(vpool_ptr + pool_at * s_pool + h * D + offs_d, v)
    tl.store(vres_ptr + res_at * s_res + h * D + offs_d, v)
    if KEEP_K:
        tl.store(kres_ptr + res_at * s_res + h * D + offs_d, k)
    tl.store(ring_ptr + ring_at * s_ring + h * D + offs_d, tl.load(kp_ptr + h * s_in + offs_d))
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    b = tl.load(b_ptr + h * s_bh + offs_r[:, None] * s_br + offs_d[None, :], mask=mask_r[:, None], other=0.0)
    a = tl.sum(b.to(tl.float32) * k.to(tl.float32)[None, :], axis=1)  # (BLOCK_R,) the fp32 projection
    scale = tl.math.div_rn(tl.max(tl.abs(a), axis=0), 127.0)
    scale = tl.where(scale > 0.0, scale, 1.0)
    qa = tl.minimum(tl.maximum(_round_half_even(tl.math.div_rn(a, scale)), -127.0), 127.0)
    tl.store(c_ptr + h * s_ch + at * s_ct + offs_r, qa.to(tl.int8), mask=mask_r)
    tl.store(rs_ptr + h * s_rh + at, scale)


def append_token_triton(k, v, k_pre, at, pool_at, k_pool, v_pool, k_res, v_res, res_at, ring, ring_at, basis, coeffs,
                        row_scale):
    """Same contract as `append_token_torch`; D a power of two, every (Hkv, D) row block contiguous, k, v, k_pre
    alike and k_pool, v_pool alike. One launch."""
    _, hkv, d = k.shape
    rows = (k, v, k_pre, k_pool, v_pool, v_res, ring)
    if k_res is not None and k_res.stride() != v_res.stride():
        raise ValueError("append_token_triton needs k_res laid out like v_res")
    if d & (d - 1) or any(t.stride(1) != d or t.stride(2) != 1 for t in rows) or v_pool.stride() != k_pool.stride() \
            or basis.stride(2) != 1 or coeffs.stride(2) != 1:
        raise ValueError("append_token_triton needs D a power of two and contiguous (Hkv, D) rows")
    rank = basis.shape[1]
    _append_token_kernel[(hkv,)](
        k, v, k_pre, at, pool_at, k_pool, v_pool, v_res if k_res is None else k_res, v_res, res_at, ring, ring_at, basis,
        coeffs, row_scale, rank,
        d, k_pool.stride(0), v_res.stride(0), ring.stride(0), basis.stride(0), basis.stride(1),
        coeffs.stride(0), coeffs.stride(1), row_scale.stride(0),
        D=d, BLOCK_R=max(16, triton.next_power_of_2(rank)), KEEP_K=k_res is not None,
    )
