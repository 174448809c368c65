"""Triton twin of silu_mul.silu_mul_torch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(x_ptr, y_ptr, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * 2 * inter + offs, mask=mask, other=0.0)
    u = tl.load(x_ptr + row * 2 * inter + inter + offs, mask=mask, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # rounded like torch's silu before the product
    tl.store(y_ptr + row * inter + offs, act * u, mask=mask)


def silu_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as `silu_mul_torch`."""
    gate_up = gate_up.contiguous()
    t, two_i = gate_up.shape
    inter = two_i // 2
    y = torch.empty((t, inter), device=gate_up.device, dtype=gate_up.dtype)  # (T, I)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](gate_up, y, inter, BLOCK=block)
    return y
