"""Residual add fused with RMSNorm: h' = h + delta; y = w * rmsnorm(h'). One launch per call on CUDA.

The torch reference rounds h' to h's dtype before normalising, as the unfused model does.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch


def add_rms_norm_torch(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h, delta (T, N), weight (N,) -> (h + delta, w * norm(h + delta)); delta None skips the add. No mutation."""
    if delta is not None:
        h = h + delta
    xf = h.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return h, weight * xf.to(h.dtype)


def add_rms_norm(h, delta, weight, eps, *, impl: str | None = None):
    """Dispatching entry point: see `add_rms_norm_torch`."""
    return dispatch.get("add_rms_norm", h.device, impl, module="norm")(h, delta, weight, eps)
