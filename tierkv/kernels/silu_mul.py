"""SwiGLU's activation: silu(gate) * up from the fused gate/up projection, one launch on CUDA."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tierkv.kernels import dispatch


def silu_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) -> silu(gate) * up (T, I) in gate_up's dtype. No mutation."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_mul(gate_up, *, impl: str | None = None):
    """Dispatching entry point: see `silu_mul_torch`."""
    return dispatch.get("silu_mul", gate_up.device, impl)(gate_up)
