"""Triton twin of `shadow_paged_attention_torch`: keys rebuilt from the shadow (A rows @ B halves, RoPE)
or read exact from the pool, values read from the pool (from its GPU-resident copy for a run of slots, picks
from the GPU chunk cache when one is given),
split-K online softmax, then the shared merge.
Rotate-half works on the two halves of D, so q and keys are held as (lo, hi) halves throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from tierkv.kernels.decode_attention_triton import merge_splits, online_softmax_step, plan_splits, store_partial
from tierkv.kernels.rebuild_keys import shadow_views
from tierkv.kernels.shadow_attention import shadow_paged_attention_torch
from tierkv.kernels.split_blocks import rank_step, shadow_split_block_n

_LOG2E = 1.4426950408889634


def shadow_block_n(q: torch.Tensor, pool_dtype: torch.dtype, rank: int) -> int | None:
    """Keys per block of a shadow split for a query (Hq, D) over pools of `pool_dtype` and a shadow of `rank`; None:
    no block fits (shadow_paged_attention_triton then runs the torch reference). split_blocks' estimate, unless a
    launch here found it too large."""
    key = _block_key(q, pool_dtype, rank)
    if key in _MEASURED_BLOCKS:
        return _MEASURED_BLOCKS[key]
    return shadow_split_block_n(q.device, q.shape[-1], rank, key[-1])


# (device, D, basis block, element bytes) -> the block a launch fitted after the estimate's did not (None: none did)
_MEASURED_BLOCKS: dict[tuple, int | None] = {}


def _block_key(q: torch.Tensor, pool_dtype: torch.dtype, rank: int) -> tuple:
    """What the kernel's shared memory depends on: device, D, the padded rank and the tiles' element bytes (fp32
    queries take fp32 dots throughout)."""
    elt = 4 if q.dtype == torch.float32 else pool_dtype.itemsize
    return (q.device, q.shape[-1], max(16, triton.next_power_of_2(rank)), elt)


# the resident range depends on the KV budget, not on the kernel's shapes: no recompile per budget
@triton.jit(do_not_specialize=["res_lo", "n_res"])
def _shadow_split_kernel(
    q_ptr, a_ptr, b_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, cid_ptr, po_ptr, pl_ptr,
    kc_ptr, vc_ptr, csrc_ptr, vr_ptr, kr_ptr,
    n_items, per_split, scale_log2, group, hq, rank, s_last, n_fixed, res_lo, n_res,
    s_ah, s_at, s_bh, s_br, s_bd, s_ct, s_kslot, s_kt, s_kh, s_vslot, s_vt, s_vh, s_sh, s_se,
    s_cslot, s_ct2, s_ch, s_csh,
    CHUNK: tl.constexpr, HALF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    F32_DOT: tl.constexpr, USE_CACHE: tl.constexpr, R_STEP: tl.constexpr, LOWP_REBUILD: tl.constexpr,
    RES_KEYS: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < group
    rows = h * group + offs_g
    offs_h = tl.arange(0, HALF)
    q_row = q_ptr + rows[:, None] * (2 * HALF) + offs_h[None, :]
    q_lo = tl.load(q_row, mask=mask_g[:, None], other=0.0)  # (BLOCK_G, HALF)
    q_hi = tl.load(q_row + HALF, mask=mask_g[:, None], other=0.0)
    kdt = tl.float32 if F32_DOT else q_lo.dtype
    q_lo, q_hi = q_lo.to(kdt), q_hi.to(kdt)
    # the rebuild dot A[t] @ B: 16-bit coefficients and basis go to the tensor cores as stored (their products
    # are exact in fp32, so only the summation order differs from the fp32 reference); else fp32 IEEE
    rdt = b_ptr.dtype.element_ty if LOWP_REBUILD else tl.float32
    offs_r = tl.arange(0, R_STEP)
    if R_STEP == BLOCK_R:  # the whole basis stays in registers for the program
        mask_r = offs_r < rank
        b_row = b_ptr + h * s_bh + offs_r[:, None] * s_br + offs_h[None, :] * s_bd
        b_lo = tl.load(b_row, mask=mask_r[:, None], other=0.0).to(rdt)  # (BLOCK_R, HALF)
        b_hi = tl.load(b_row + HALF * s_bd, mask=mask_r[:, None], other=0.0).to(rdt)
    start = sp * per_split
    end = tl.minimum(start + per_split, n_items)
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, 2 * HALF], tl.float32)
    offs_d = tl.arange(0, 2 * HALF)
    for i in range(0, per_split, BLOCK_N):  # fixed trip count; blocks past `end` are masked
        offs = start + i + tl.arange(0, BLOCK_N)
        entry = offs // CHUNK
        j = offs % CHUNK
        meta = h * s_sh + entry * s_se
        valid = offs < end
        slot = tl.load(slot_ptr + meta, mask=valid, other=0).to(tl.int64)
        valid = valid & (j < tl.load(len_ptr + meta, mask=valid, other=0))
        cid = tl.load(cid_ptr + meta, mask=valid, other=-1).to(tl.int64)
        exact = cid < 0
        tok = tl.minimum(tl.maximum(cid, 0) * CHUNK + j, s_last)
        a_row = a_ptr + h * s_ah + tok[:, None] * s_at
        a_m = (valid & ~exact)[:, None]
        if R_STEP == BLOCK_R:
            a = tl.load(a_row + offs_r[None, :], mask=a_m & mask_r[None, :], other=0.0).to(rdt)
            lo = tl.dot(a, b_lo, input_precision="ieee")  # (BLOCK_N, HALF) pre-RoPE
            hi = tl.dot(a, b_hi, input_precision="ieee")
        else:  # ranks above 64: the basis in R_STEP slices from cache, or its registers spill (25x slower)
            lo = tl.zeros([BLOCK_N, HALF], tl.float32)
            hi = tl.zeros([BLOCK_N, HALF], tl.float32)
            for r0 in tl.static_range(0, BLOCK_R, R_STEP):
                rr = r0 + offs_r
                a = tl.load(a_row + rr[None, :], mask=a_m & (rr < rank)[None, :], other=0.0).to(rdt)
                b_row = b_ptr + h * s_bh + rr[:, None] * s_br + offs_h[None, :] * s_bd
                b_lo = tl.load(b_row, mask=(rr < rank)[:, None], other=0.0).to(rdt)  # (R_STEP, HALF)
                b_hi = tl.load(b_row + HALF * s_bd, mask=(rr < rank)[:, None], other=0.0).to(rdt)
                lo += tl.dot(a, b_lo, input_precision="ieee")
                hi += tl.dot(a, b_hi, input_precision="ieee")
        c_row = cos_ptr + tok[:, None] * s_ct + offs_h[None, :]
        s_row = sin_ptr + tok[:, None] * s_ct + offs_h[None, :]
        rope_m = (valid & ~exact)[:, None]
        c_lo = tl.load(c_row, mask=rope_m, other=0.0).to(tl.float32)
        c_hi = tl.load(c_row + HALF, mask=rope_m, other=0.0).to(tl.float32)
        s_lo = tl.load(s_row, mask=rope_m, other=0.0).to(tl.float32)
        s_hi = tl.load(s_row + HALF, mask=rope_m, other=0.0).to(tl.float32)
        k_off = (slot * s_kslot + j * s_kt + h * s_kh)[:, None]
        v_off = (slot * s_vslot + j * s_vt + h * s_vh)[:, None]
        # values of slots [res_lo, res_lo + n_res) are resident on the GPU (the pool's layout): no host-link read
        rel = slot - res_lo
        v_res_off = (rel * s_vslot + j * s_vt + h * s_vh)[:, None]
        on_gpu = ((rel >= 0) & (rel < n_res))[:, None]
        v_base = tl.where(on_gpu, vr_ptr + v_res_off, v_ptr + v_off)
        if RES_KEYS:  # exact keys of resident slots too (k_resident shares v_resident's layout)
            k_base = tl.where(on_gpu, kr_ptr + v_res_off, k_ptr + k_off)
        else:
            k_base = k_ptr + k_off
        if USE_CACHE:  # picks (entries past the fixed ones) with a cache slot are read from the chunk cache
            pe = entry - n_fixed
            cs = tl.load(csrc_ptr + h * s_csh + pe, mask=valid & (pe >= 0), other=-1)
            cached = (cs != -1)[:, None]
            c_off = (tl.where(cs >= 0, cs, -cs - 2) * s_cslot + j * s_ct2 + h * s_ch)[:, None]
            k_row = tl.where(cached, kc_ptr + c_off, k_base) + offs_h[None, :]
            v_row = tl.where(cached, vc_ptr + c_off, v_base) + offs_d[None, :]
        else:
            k_row = k_base + offs_h[None, :]
            v_row = v_base + offs_d[None, :]
        ex_m = (valid & exact)[:, None]
        e_lo = tl.load(k_row, mask=ex_m, other=0.0)
        e_hi = tl.load(k_row + HALF, mask=ex_m, other=0.0)
        # rebuilt keys are rounded to the pool dtype, as the reference does
        k_lo = tl.where(ex_m, e_lo, (lo * c_lo - hi * s_lo).to(e_lo.dtype)).to(kdt)  # (BLOCK_N, HALF)
        k_hi = tl.where(ex_m, e_hi, (hi * c_hi + lo * s_hi).to(e_hi.dtype)).to(kdt)
        v = tl.load(v_row, mask=valid[:, None], other=0.0).to(kdt)  # (BLOCK_N, D)
        s = tl.dot(q_lo, tl.trans(k_lo), input_precision="ieee")
        s = (s + tl.dot(q_hi, tl.trans(k_hi), input_precision="ieee")) * scale_log2  # (BLOCK_G, BLOCK_N)
        m_i, l_i, acc = online_softmax_step(s, valid, v, m_i, l_i, acc)
    store_partial(po_ptr, pl_ptr, sp, hq, rows, mask_g, offs_d, m_i, l_i, acc, 2 * HALF)


def shadow_paged_attention_triton(
    q: torch.Tensor,
    coeffs: torch.Tensor,
    basis: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    chunk_ids: torch.Tensor,
    scale: float | None = None,
    cache: tuple[torch.Tensor, ...] | None = None,
    v_resident: torch.Tensor | None = None,
    resident_from: int = 0,
    k_resident: torch.Tensor | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `shadow_paged_attention_torch`; D a power of two >= 32. Two launches, no host sync."""
    hq, d = q.shape
    _, chunk, hkv, _ = k_pool.shape
    if d < 32 or d & (d - 1):
        raise ValueError(f"shadow_paged_attention_triton needs D a power of two >= 32, got {d}")
    a3, b3, _ = shadow_views(coeffs, basis, slots, d)
    rank = b3.shape[1]
    block_n = shadow_block_n(q, v_pool.dtype, rank)
    if block_n is None:
        return shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids,
                                            scale, cache, v_resident, resident_from, k_resident)
    slots, lengths, chunk_ids = (t.expand(hkv, -1).contiguous() for t in (slots, lengths, chunk_ids))
    cos, sin, q = cos.contiguous(), sin.contiguous(), q.contiguous()
    if a3.stride(-1) != 1:
        a3 = a3.contiguous()
    n_items = slots.shape[1] * chunk
    f32_dot = q.dtype == torch.float32 or q.device.type != "cuda"  # the CPU interpreter's bf16 dot is wrong
    lowp = not f32_dot and a3.dtype == b3.dtype and a3.dtype in (torch.bfloat16, torch.float16)
    block_r = max(16, triton.next_power_of_2(rank))
    if cache is not None:
        k_cache, v_cache, csrc = cache
        if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1 or csrc.stride(1) != 1:
            raise ValueError("shadow_paged_attention_triton needs k_cache/v_cache of one layout, D contiguous")
        n_fixed, cstr = slots.shape[1] - csrc.shape[1], k_cache.stride()
    else:  # unused pointers; USE_CACHE=False compiles the cache path out
        k_cache = v_cache = csrc = slots
        n_fixed, cstr = 0, (0, 0, 0)
    n_res = 0 if v_resident is None else v_resident.shape[0]
    if n_res and (v_resident.stride() != v_pool.stride() or k_pool.stride() != v_pool.stride()
                  or (k_resident is not None and k_resident.stride() != v_resident.stride())):
        raise ValueError("shadow_paged_attention_triton needs k/v pools and their resident copies laid out alike")
    res_keys = bool(n_res) and k_resident is not None

    def launch(block_n: int):
        splits, per_split, po, pl = plan_splits(q, hkv, n_items, block_n, num_splits)
        _shadow_split_kernel[(hkv, splits)](
            q, a3, b3, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids, po, pl, k_cache, v_cache, csrc,
            v_resident if n_res else v_pool, k_resident if res_keys else k_pool,
            n_items, per_split, (d**-0.5 if scale is None else scale) * _LOG2E, hq // hkv, hq, rank, a3.shape[1] - 1,
            n_fixed, resident_from, n_res,
            a3.stride(0), a3.stride(1), b3.stride(0), b3.stride(1), b3.stride(2), cos.stride(0),
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            slots.stride(0), slots.stride(1), cstr[0], cstr[1], cstr[2], csrc.stride(0),
            USE_CACHE=cache is not None, CHUNK=chunk, HALF=d // 2, BLOCK_G=max(16, triton.next_power_of_2(hq // hkv)),
            BLOCK_N=block_n, BLOCK_R=block_r, R_STEP=rank_step(block_r), F32_DOT=f32_dot, LOWP_REBUILD=lowp,
            RES_KEYS=res_keys,
        )
        return po, pl

    while block_n is not None:
        try:
            po, pl = launch(block_n)
        except OutOfResources:
            # this Triton build staged more than shadow_block_n estimated: it raises before anything is queued,
            # so a smaller block (or the reference) runs instead, and later calls start there
            block_n = block_n // 2 if block_n > 16 else None
            _MEASURED_BLOCKS[_block_key(q, v_pool.dtype, rank)] = block_n
        else:
            return merge_splits(po, pl, q.dtype)
    return shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids, scale,
                                        cache, v_resident, resident_from, k_resident)
