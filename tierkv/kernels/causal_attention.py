"""Exact causal attention over K/V held whole on the compute device (the dense caches, and the sparse cache's steps
whose budget covers the context): SDPA with GQA, a bottom-right causal mask, optionally a sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Attention of the T queries that are the last T of the S keys, causally; GQA by head groups.

    q (T, Hq, D), k/v (S, Hkv, D) with S >= T -> (T, Hq, D). window: each query sees only itself and the
    window - 1 keys before it (a sliding-window layer); None sees every earlier key. Does not mutate; computes in
    q's dtype.
    """
    t = q.shape[0]
    if window is not None:  # keys older than every query's window are never read
        k, v = k[-(t + window - 1):], v[-(t + window - 1):]
    s = k.shape[0]
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # (H, T|S, D)
    if q.is_cuda:  # SDPA's flash / memory-efficient kernels take 4-D inputs only; the CPU keeps its plain path,
        qh, kh, vh = qh[None], kh[None], vh[None]  # whose numerics the chunked-prefill tests pin down
    # one query at the end sees every key; more get a bottom-right causal mask, which SDPA runs in its
    # fused kernels (an explicit boolean mask sends long prefills to the slow materialising path)
    mask = None
    if t > 1:
        mask = causal_lower_right(t, s) if window is None else _window_mask(t, s, window, q.device)
    group = qh.shape[-3] // kh.shape[-3]
    if group > 1 and t > 1:
        # K/V widened to every query head: with GQA and a causal bias SDPA may leave its fused kernels
        kh, vh = kh.repeat_interleave(group, dim=-3), vh.repeat_interleave(group, dim=-3)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, enable_gqa=qh.shape[-3] != kh.shape[-3])
    return out.reshape(-1, t, out.shape[-1]).transpose(0, 1)


def _window_mask(t: int, s: int, window: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool, True where query i (key position s - t + i) may read key j: s - t + i - window < j <= s - t + i."""
    lag = torch.arange(s - t, s, device=device)[:, None] - torch.arange(s, device=device)[None, :]  # (T, S)
    return (lag >= 0) & (lag < window)
