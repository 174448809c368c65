"""Triton twin of qk_rope.qk_rope_torch: one program per (token, head) over q and k heads together."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_rope_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, q_ptr, k_ptr, row_stride, hq, hkv,
                    HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    d = 2 * HALF
    offs = tl.arange(0, HALF)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c1 = tl.load(cos_ptr + pos * d + offs)
    c2 = tl.load(cos_ptr + pos * d + HALF + offs)
    s1 = tl.load(sin_ptr + pos * d + offs)
    s2 = tl.load(sin_ptr + pos * d + HALF + offs)
    src = qkv_ptr + t * row_stride + head * d  # k heads follow the q heads in the fused row
    x1 = tl.load(src + offs)
    x2 = tl.load(src + HALF + offs)
    # the same two roundings as the torch reference in low precision: x*cos and rot(x)*sin, then the sum
    y1 = (x1 * c1).to(x1.dtype) + (-x2 * s1).to(x1.dtype)
    y2 = (x2 * c2).to(x1.dtype) + (x1 * s2).to(x1.dtype)
    if head < hq:
        dst = q_ptr + (t * hq + head) * d
    else:
        dst = k_ptr + (t * hkv + head - hq) * d
    tl.store(dst + offs, y1.to(x1.dtype))
    tl.store(dst + HALF + offs, y2.to(x1.dtype))


def qk_rope_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `qk_rope_torch`."""
    t = qkv.shape[0]
    d = cos.shape[-1]
    q = torch.empty((t, num_heads, d), device=qkv.device, dtype=qkv.dtype)  # (T, Hq, D)
    k = torch.empty((t, num_kv_heads, d), device=qkv.device, dtype=qkv.dtype)  # (T, Hkv, D)
    _qk_rope_kernel[(t, num_heads + num_kv_heads)](qkv, cos, sin, positions, q, k, qkv.stride(0), num_heads,
                                                   num_kv_heads, HALF=d // 2)
    k_pre = qkv[:, num_heads * d:(num_heads + num_kv_heads) * d].view(t, num_kv_heads, d)
    return q, k, k_pre
