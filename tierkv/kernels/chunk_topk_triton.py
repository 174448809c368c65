"""Triton twin of `chunk_topk_torch`: one kernel scores tokens in the low-rank space and reduces them per
chunk (scores never reach memory); normalisation, group max, masking and top-k are the shared torch tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierkv.kernels.chunk_topk import _check, coeff_views, select_top_chunks


@triton.jit
def _chunk_scores_kernel(
    q_ptr, a_ptr, n_ptr, out_ptr,
    s_cap, rank, group, n_chunks, scale,
    s_qh, s_qg, s_ah, s_at, s_oh, s_og,
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
                mask=valid[:, None] & mask_r[None, :], other=0.0).to(tl.float32)  # (BLOCK_C*CHUNK, BLOCK_R)
    s = tl.dot(q, tl.trans(a), input_precision="ieee") * scale  # (BLOCK_G, BLOCK_C*CHUNK)
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


def chunk_scores_triton(
    q_low: torch.Tensor, coeffs: torch.Tensor, n_tokens: torch.Tensor | int, chunk_size: int, scale: float, reduce: str
) -> torch.Tensor:
    """Same contract as `chunk_scores_torch`; chunk_size must be a power of two <= 256. One launch."""
    if chunk_size & (chunk_size - 1) or chunk_size > 256:
        raise ValueError(f"chunk_topk_triton needs chunk_size a power of two <= 256, got {chunk_size}")
    hkv, g, rank = q_low.shape
    a3 = coeff_views(q_low, coeffs)  # (Hkv, S, r)
    if a3.stride(-1) != 1:
        a3 = a3.contiguous()
    q_low = q_low.float().contiguous()  # fp32 scores, as the reference
    s_cap = a3.shape[1]
    n_chunks = -(-s_cap // chunk_size)
    if not isinstance(n_tokens, torch.Tensor):
        n_tokens = torch.full((), n_tokens, dtype=torch.int64, device=q_low.device)
    out = torch.empty((hkv, g, n_chunks), device=q_low.device, dtype=torch.float32)  # (Hkv, G, C)
    block_c = max(1, 256 // chunk_size)
    _chunk_scores_kernel[(hkv, triton.cdiv(n_chunks, block_c))](
        q_low, a3, n_tokens, out, s_cap, rank, g, n_chunks, scale,
        q_low.stride(0), q_low.stride(1), a3.stride(0), a3.stride(1), out.stride(0), out.stride(1),
        MASS=reduce != "max", CHUNK=chunk_size, BLOCK_C=block_c,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_R=max(16, triton.next_power_of_2(rank)),
    )
    return out


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
    red = chunk_scores_triton(q_low, coeffs, n_tokens, chunk_size, scale, reduce)
    return select_top_chunks(red, select_end, k, first, reduce)
