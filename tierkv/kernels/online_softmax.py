"""Exact attention merged batch by batch: a running max, denominator and weighted sum in fp32 (online softmax),
so keys and values can stream from the tiers without the whole cache on the device at once.
"""

from __future__ import annotations

import math

import torch

from tierkv.kernels.span_attention import span_attention


class OnlineSoftmax:
    """Running max, denominator and weighted sum of exact attention, merged batch by batch (fp32)."""

    def __init__(self, q: torch.Tensor, num_kv_heads: int) -> None:
        t, hq, d = q.shape
        self.shape, self.dtype, self.hkv = (t, hq, d), q.dtype, num_kv_heads
        self.q_in = q
        self._q32: torch.Tensor | None = None  # the masked path's scaled fp32 query, made on first use
        grid = (num_kv_heads, hq // num_kv_heads, t)
        self.m = torch.full(grid, -math.inf, device=q.device)  # (Hkv, G, T)
        self.l = torch.zeros(grid, device=q.device)
        self.acc = torch.zeros((*grid, d), device=q.device)  # (Hkv, G, T, D)

    def add(self, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Fold keys/values k, v (S, Hkv, D) in; keep: bool (S,) or (T, S), False masks a key. Mutates."""
        if self._q32 is None:
            t, hq, d = self.shape
            qf = self.q_in.float().view(t, self.hkv, hq // self.hkv, d).permute(1, 2, 0, 3)  # (Hkv, G, T, D)
            self._q32 = qf * (1.0 / math.sqrt(d))
        s = self._q32 @ k.float().permute(1, 2, 0).unsqueeze(1)  # (Hkv, G, T, S)
        if keep is not None:
            s = s.masked_fill(~keep, -math.inf)
        m_new = torch.maximum(self.m, s.amax(-1))
        m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows that saw no key yet
        alpha = torch.exp(self.m - m_safe)
        p = torch.exp(s - m_safe.unsqueeze(-1))
        self.l = self.l * alpha + p.sum(-1)
        self.acc = self.acc * alpha.unsqueeze(-1) + p @ v.float().permute(1, 0, 2).unsqueeze(1)  # (Hkv,1,S,D)
        self.m = m_new

    def add_span(self, k: torch.Tensor, v: torch.Tensor, causal: bool = False) -> None:
        """Fold keys/values k, v (S, Hkv, D) in through a fused attention kernel (every key kept, or causal:
        query t sees key t and before, S == T) and a merge by log-sum-exp. Mutates."""
        if k.shape[0] == 0:
            return
        out, lse = span_attention(self.q_in, k, v, causal)  # (T, Hq, D), (T, Hq) fp32
        t, hq, d = self.shape
        out = out.view(t, self.hkv, hq // self.hkv, d).permute(1, 2, 0, 3)  # (Hkv, G, T, D)
        lse = lse.view(t, self.hkv, hq // self.hkv).permute(1, 2, 0)  # (Hkv, G, T)
        m_new = torch.maximum(self.m, lse)  # finite: every query row of a span sees at least one key
        alpha, beta = torch.exp(self.m - m_new), torch.exp(lse - m_new)
        self.l = self.l * alpha + beta
        self.acc = self.acc * alpha.unsqueeze(-1) + out * beta.unsqueeze(-1)
        self.m = m_new

    def result(self) -> torch.Tensor:
        out = self.acc / self.l.unsqueeze(-1)  # (Hkv, G, T, D)
        return out.permute(2, 0, 1, 3).reshape(self.shape).to(self.dtype)  # (T, Hq, D)
