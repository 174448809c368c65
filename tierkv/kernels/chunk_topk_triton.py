"""Triton twin of `chunk_topk_torch`: one kernel scores tokens in the low-rank space and reduces them per
chunk (scores never reach memory); normalisation, group max, masking and top-k are the shared torch tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierkv.kernels.chunk_topk import _check, coeff_views


@triton.jit
def _chunk_scores_kernel(
    q_ptr, a_ptr, n_ptr, out_ptr, part_ptr,
    s_cap, rank, group, n_chunks, scale,
    s_qh, s_qg, s_ah, s_at, s_oh, s_og, s_ph, s_pg,
    MASS: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_R: tl.constexpr,
):
    h = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    n_tokens = tl.load(n_ptr)
    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    q = tl.load(q_ptr + h * s_qh + offs_g[:, None] * s_qg + offs_r[None, :],
                mask=(offs_g[:, None] < group) & mask_r[None, :], other=0.0)  # (BLOCK_G, BLOCK_R)
    offs_t = c0 * CHUNK + tl.arange(0, BLOCK_C * CHUNK)
    valid = (offs_t < s_cap) & (offs_t < n_tokens)
    a = tl.load(a_ptr + h * s_ah + offs_t[:, None].to(tl.int64) * s_at + offs_r[None, :],
                mask=valid[:, None] & mask_r[None, :], other=0.0).to(q.dtype)  # (BLOCK_C*CHUNK, BLOCK_R)
    # half-precision inputs go to the tensor cores as they are (their products are exact in the fp32
    # accumulator); fp32 inputs keep the exact fp32 dot
    s = tl.dot(q, tl.trans(a), input_precision="ieee", out_dtype=tl.float32) * scale  # (BLOCK_G, BLOCK_C*CHUNK)
    s = tl.where(valid[None, :], s, float("-inf"))
    s3 = tl.reshape(s, (BLOCK_G, BLOCK_C, CHUNK))
    mx = tl.max(s3, axis=2)  # (BLOCK_G, BLOCK_C)
    if MASS:
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.sum(tl.exp(s3 - safe[:, :, None]), axis=2)
        mx = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + safe, float("-inf"))
    offs_c = c0 + tl.arange(0, BLOCK_C)
    o_mask = (offs_g[:, None] < group) & (offs_c[None, :] < n_chunks)
    tl.store(out_ptr + h * s_oh + offs_g[:, None] * s_og + offs_c[None, :], mx, mask=o_mask)
    if MASS:  # this block's share of each query head's total mass, so the top-k tail need not re-read all chunks
        tl.store(part_ptr + h * s_ph + offs_g * s_pg + tl.program_id(1), _lse_rows(mx, 1), mask=offs_g < group)


def chunk_scores_triton(
    q_low: torch.Tensor, coeffs: torch.Tensor, n_tokens: torch.Tensor | int, chunk_size: int, scale: float, reduce: str,
    with_parts: bool = False,
):
    """Same contract as `chunk_scores_torch`; chunk_size must be a power of two <= 256. One launch.

    with_parts=True also returns the log-sum-exp of each program's block of chunks, (Hkv, G, blocks) fp32
    ('mass' reduces only; the chunk scores themselves otherwise)."""
    if chunk_size & (chunk_size - 1) or chunk_size > 256:
        raise ValueError(f"chunk_topk_triton needs chunk_size a power of two <= 256, got {chunk_size}")
    hkv, g, rank = q_low.shape
    a3 = coeff_views(q_low, coeffs)  # (Hkv, S, r)
    if a3.stride(-1) != 1:
        a3 = a3.contiguous()
    # the reference scores in fp32 from q_low and A as given; bf16/fp16 pairs keep their dtype for the dot
    half = q_low.dtype == a3.dtype and q_low.dtype in (torch.bfloat16, torch.float16) and q_low.device.type == "cuda"
    q_low = (q_low if half else q_low.float()).contiguous()
    s_cap = a3.shape[1]
    n_chunks = -(-s_cap // chunk_size)
    if not isinstance(n_tokens, torch.Tensor):
        n_tokens = torch.full((), n_tokens, dtype=torch.int64, device=q_low.device)
    out = torch.empty((hkv, g, n_chunks), device=q_low.device, dtype=torch.float32)  # (Hkv, G, C)
    block_c = max(1, 256 // chunk_size)
    blocks = triton.cdiv(n_chunks, block_c)
    parts = torch.empty((hkv, g, blocks), device=q_low.device, dtype=torch.float32) if reduce != "max" else out
    _chunk_scores_kernel[(hkv, blocks)](
        q_low, a3, n_tokens, out, parts, s_cap, rank, g, n_chunks, scale,
        q_low.stride(0), q_low.stride(1), a3.stride(0), a3.stride(1), out.stride(0), out.stride(1),
        parts.stride(0), parts.stride(1),
        MASS=reduce != "max", CHUNK=chunk_size, BLOCK_C=block_c,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_R=max(16, triton.next_power_of_2(rank)),
    )
    return (out, parts) if with_parts else out


@triton.jit
def _lse_rows(x, axis: tl.constexpr):
    """log-sum-exp along axis; -inf where every entry is -inf."""
    mx = tl.max(x, axis)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(x - tl.expand_dims(safe, axis)), axis)
    return tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + safe, float("-inf"))


@triton.jit
def _group_reduce_kernel(
    red_ptr, part_ptr, out_ptr, end_ptr, n_chunks, n_parts, group, first, s_rh, s_rg, s_ph, s_pg, s_oh,
    MASS: tl.constexpr, GROUP_MASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """select_top_chunks' tail before top-k for one KV head and one block of chunks: normalise each query head's
    chunk scores by its total log-sum-exp (combined from n_parts partial ones), reduce over the group, mask
    chunks outside [first, select_end)."""
    h = tl.program_id(0)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < group
    shift = tl.zeros([BLOCK_G], tl.float32)
    if MASS:  # online log-sum-exp over the partials of each query head
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_G], tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            x = tl.load(part_ptr + h * s_ph + offs_g[:, None] * s_pg + offs_p[None, :],
                        mask=mask_g[:, None] & (offs_p < n_parts)[None, :], other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
            m = m_new
        safe = tl.where(m == float("-inf"), 0.0, m)
        shift = tl.where(acc > 0, tl.log(tl.where(acc > 0, acc, 1.0)) + safe, 0.0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < n_chunks
    x = tl.load(red_ptr + h * s_rh + offs_g[:, None] * s_rg + offs_c[None, :],
                mask=mask_g[:, None] & mask_c[None, :], other=float("-inf"))
    x = x - shift[:, None]
    if GROUP_MASS:
        best = _lse_rows(x, 0)
    else:
        best = tl.max(x, 0)
    best = tl.where((offs_c >= first) & (offs_c < tl.load(end_ptr)), best, float("-inf"))
    tl.store(out_ptr + h * s_oh + offs_c, best, mask=mask_c)


def select_top_chunks_triton(red: torch.Tensor, select_end: torch.Tensor | int, k: int, first: int,
                             reduce: str, parts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as chunk_topk.select_top_chunks: one Triton launch for the tail, then torch.topk.

    parts: optional (Hkv, G, P) partial log-sum-exps whose total equals that of red's rows (the scoring kernel's).
    """
    hkv, g, c = red.shape
    if not 0 < k <= c:
        raise ValueError(f"chunk_topk: k={k} must be in 1..{c} (the chunk count)")
    if not isinstance(select_end, torch.Tensor):
        select_end = torch.full((), select_end, dtype=torch.int64, device=red.device)
    red = red.contiguous()
    parts = red if parts is None else parts.contiguous()
    best = torch.empty((hkv, c), device=red.device, dtype=torch.float32)  # (Hkv, C)
    block_c = 256
    _group_reduce_kernel[(hkv, triton.cdiv(c, block_c))](
        red, parts, best, select_end, c, parts.shape[-1], g, first, red.stride(0), red.stride(1),
        parts.stride(0), parts.stride(1), best.stride(0),
        MASS=reduce != "max", GROUP_MASS=reduce == "group-mass", BLOCK_G=max(2, triton.next_power_of_2(g)),
        BLOCK_P=1024, BLOCK_C=block_c,
    )
    scores, top = torch.topk(best, k, dim=-1)  # (Hkv, k)
    return top, scores


def chunk_topk_triton(
    q_low: torch.Tensor,
    coeffs: torch.Tensor,
    n_tokens: torch.Tensor | int,
    select_end: torch.Tensor | int,
    k: int,
    chunk_size: int,
    scale: float,
    first: int = 0,
    reduce: str = "mass",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `chunk_topk_torch`: fused score + per-chunk reduce, then the shared torch tail."""
    _check(q_low, coeffs, reduce)
    red, parts = chunk_scores_triton(q_low, coeffs, n_tokens, chunk_size, scale, reduce, with_parts=True)
    return select_top_chunks_triton(red, select_end, k, first, reduce, parts if reduce != "max" else None)
