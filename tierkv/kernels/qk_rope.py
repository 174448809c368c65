"""RoPE on the query and key parts of a fused QKV projection, at given positions, in one launch on CUDA.

The torch reference computes x*cos + rotate_half(x)*sin in x's dtype, as the model's eager path does.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def qk_rope_torch(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                  num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv (T, (Hq + 2 Hkv) D); cos/sin (S, D) tables; positions (T,) -> q (T, Hq, D), k (T, Hkv, D) rotated,
    and the pre-RoPE keys (T, Hkv, D). No mutation."""
    t = qkv.shape[0]
    d = cos.shape[-1]
    q, k, _ = qkv.split([num_heads * d, num_kv_heads * d, num_kv_heads * d], dim=-1)
    q, k_pre = q.view(t, num_heads, d), k.view(t, num_kv_heads, d)  # (T, H, D)
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]  # (T, 1, D)
    return q * c + _rotate_half(q) * s, k_pre * c + _rotate_half(k_pre) * s, k_pre


def qk_rope(qkv, cos, sin, positions, num_heads, num_kv_heads, *, impl: str | None = None):
    """Dispatching entry point: see `qk_rope_torch`."""
    return dispatch.get("qk_rope", qkv.device, impl)(qkv, cos, sin, positions, num_heads, num_kv_heads)
