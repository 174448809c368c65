"""Rotary position embedding (Llama rotate-half convention) applied at given positions.

Shared by the key rebuild reference and callers that rotate q or new keys; pure torch.
"""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., D) -> (..., D): [x1, x2] -> [-x2, x1] with x1, x2 the two halves of the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate `x` (n, H, D) at `positions` (n,) shared by all heads, or (H, n) per head.

    cos/sin: (S_max, D) tables indexed by position. Computes x*cos + rotate_half(x)*sin in fp32 and
    returns a new tensor in x's dtype; no host sync, nothing mutated.
    """
    if positions.dim() == 1:
        c = cos[positions].float().unsqueeze(1)  # (n, 1, D)
        s = sin[positions].float().unsqueeze(1)  # (n, 1, D)
    else:
        c = cos[positions].float().transpose(0, 1)  # (n, H, D)
        s = sin[positions].float().transpose(0, 1)  # (n, H, D)
    xf = x.float()
    return (xf * c + rotate_half(xf) * s).to(x.dtype)
