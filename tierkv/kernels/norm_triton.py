"""Triton twin of norm.add_rms_norm_torch: one program per row, the row held in registers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _add_rms_norm_kernel(h_ptr, d_ptr, w_ptr, h_out_ptr, y_ptr, n, eps,
                         HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(h_ptr + row * n + offs, mask=mask, other=0.0)
    if HAS_DELTA:
        x = x + tl.load(d_ptr + row * n + offs, mask=mask, other=0.0)
        tl.store(h_out_ptr + row * n + offs, x, mask=mask)  # rounded to h's dtype, as in the reference
        x = tl.load(h_out_ptr + row * n + offs, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n + eps)
    normed = (xf * inv).to(h_out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + row * n + offs, w * normed, mask=mask)


def add_rms_norm_triton(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `add_rms_norm_torch`; returns new tensors."""
    h = h.contiguous()
    t, n = h.shape
    h_out = torch.empty_like(h) if delta is not None else h
    y = torch.empty_like(h)
    d = delta.contiguous() if delta is not None else h
    _add_rms_norm_kernel[(t,)](h, d, weight, h_out, y, n, eps, HAS_DELTA=delta is not None,
                               BLOCK=triton.next_power_of_2(n), num_warps=8 if n >= 4096 else 4)
    return h_out, y
