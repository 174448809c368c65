"""Rebuild post-RoPE keys of picked tokens from a low-rank key shadow: RoPE(A[idx] @ B).

Torch reference `rebuild_keys_torch`; the fused Triton twin lives in rebuild_keys_triton.py.
Layouts: shared A (S, r) with B (r, Hkv*D) (the storage format), or per-KV-head A (Hkv, S, r) with B (Hkv, r, D).
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch
from tierkv.kernels.rope import rope_torch


def shadow_views(coeffs: torch.Tensor, basis: torch.Tensor, idx: torch.Tensor, head_dim: int):
    """Normalise both shadow layouts to per-head views (no copies).

    Returns (A3 (Hkv, S, r) with head stride 0 when shared, B3 (Hkv, r, D), idx2 (Hkv, n)).
    """
    if coeffs.dim() == 2:
        r, hd = basis.shape
        hkv = hd // head_dim
        a3 = coeffs.unsqueeze(0).expand(hkv, -1, -1)  # (Hkv, S, r), stride 0 over heads
        b3 = basis.view(r, hkv, head_dim).permute(1, 0, 2)  # (Hkv, r, D)
    else:
        hkv = coeffs.shape[0]
        a3, b3 = coeffs, basis  # (Hkv, S, r), (Hkv, r, D)
    idx2 = idx.expand(hkv, -1) if idx.dim() == 1 else idx  # (Hkv, n)
    return a3, b3, idx2


def rebuild_keys_torch(
    coeffs: torch.Tensor,
    basis: torch.Tensor,
    idx: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Keys (n, Hkv, D) of tokens `idx`, rebuilt as RoPE(A[idx] @ B) at `positions` (default: idx).

    coeffs/basis: shared A (S, r) + B (r, Hkv*D), or per-head A (Hkv, S, r) + B (Hkv, r, D); same dtype.
    idx: (n,) tokens for every KV head, or (Hkv, n) per-head picks (keys[i, h] is token idx[h, i]).
    cos/sin: (S_max, D). Matmul and RoPE in fp32; result in out_dtype (default basis.dtype). No host sync.
    """
    head_dim = cos.shape[-1]
    a3, b3, idx2 = shadow_views(coeffs, basis, idx, head_dim)
    hkv = b3.shape[0]
    heads = torch.arange(hkv, device=idx2.device).unsqueeze(1)  # (Hkv, 1)
    a = a3[heads, idx2].float()  # (Hkv, n, r)
    pre = torch.bmm(a, b3.float()).transpose(0, 1)  # (n, Hkv, D)
    pos = idx2 if positions is None else (positions.expand(hkv, -1) if positions.dim() == 1 else positions)
    keys = rope_torch(pre, cos, sin, pos)  # (n, Hkv, D) fp32
    return keys.to(out_dtype or basis.dtype)


def rebuild_keys(coeffs, basis, idx, cos, sin, positions=None, out_dtype=None, *, impl: str | None = None):
    """Dispatching entry point: see `rebuild_keys_torch` for the contract."""
    fn = dispatch.get("rebuild_keys", idx.device, impl)
    return fn(coeffs, basis, idx, cos, sin, positions, out_dtype)
