"""Attention of a span of query tokens over one batch of keys, returning the log-sum-exp so batches merge.

The tiered caches stream K/V in batches of chunks and merge the batches with an online softmax; for a prefill
slice (many query tokens) the per-batch attention must be a fused kernel, or prefill cost grows with the square
of the context at the speed of unfused fp32 math. PyTorch's own fused attention kernels return the log-sum-exp
(flash attention on CPU and CUDA, memory-efficient attention on CUDA for fp32), so `span_attention_fused` calls
those; `span_attention_torch` is the tiled reference with the same contract. No Triton twin: the ATen kernels
already are the fused version on both devices.
"""

from __future__ import annotations

import math

import torch

_TILE = 256  # query rows per step of the reference: bounds its (Hkv, G, tile, S) score block


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> None:
    t, hq, d = q.shape
    s, hkv, dk = k.shape
    if v.shape != k.shape or dk != d or hq % hkv:
        raise ValueError(f"span attention got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: "
                         "need q (T, Hq, D), k and v (S, Hkv, D) with Hkv dividing Hq")
    if causal and s != t:
        raise ValueError(f"causal span attention needs as many keys as queries, got {s} keys for {t} queries")


def span_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (T, Hq, D) over k, v (S, Hkv, D); query head g uses KV head g // (Hq // Hkv).

    causal: query t sees keys [0, t] (needs S == T). Returns out (T, Hq, D) fp32 and lse (T, Hq) fp32
    (natural log). Computes in fp32, `_TILE` query rows at a time. Nothing mutated.
    """
    _check(q, k, v, causal)
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    kf = k.float().permute(1, 2, 0).unsqueeze(1)  # (Hkv, 1, D, S)
    vf = v.float().permute(1, 0, 2).unsqueeze(1)  # (Hkv, 1, S, D)
    outs, lses = [], []
    for lo in range(0, t, _TILE):
        hi = min(lo + _TILE, t)
        qf = q[lo:hi].float().view(hi - lo, hkv, g, d).permute(1, 2, 0, 3) * scale  # (Hkv, G, tile, D)
        sc = qf @ kf  # (Hkv, G, tile, S)
        if causal:
            rows = torch.arange(lo, hi, device=q.device).unsqueeze(1)
            sc = sc.masked_fill(torch.arange(s, device=q.device) > rows, -math.inf)
        lse = torch.logsumexp(sc, dim=-1)  # (Hkv, G, tile)
        out = torch.exp(sc - lse.unsqueeze(-1)) @ vf  # (Hkv, G, tile, D)
        outs.append(out.permute(2, 0, 1, 3).reshape(hi - lo, hq, d))
        lses.append(lse.permute(2, 0, 1).reshape(hi - lo, hq))
    return torch.cat(outs), torch.cat(lses)


def _aten(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, causal: bool, scale: float):
    """PyTorch's fused attention with log-sum-exp on (1, H, T, D) inputs -> out (1, H, T, D), lse (1, H, T)."""
    if q4.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q4, k4, v4, 0.0, causal, scale=scale)
    if q4.dtype in (torch.float16, torch.bfloat16) and q4.shape[-1] <= 256:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q4, k4, v4, 0.0, causal, False, scale=scale)[:2]
        return out, lse
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q4, k4, v4, None, True, 0.0, causal,
                                                                      scale=scale)[:2]
    return out, lse[..., :q4.shape[2]]  # the memory-efficient kernel pads lse's rows


def span_attention_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                         scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `span_attention_torch`, through PyTorch's fused attention kernels.

    Without a causal mask the G query heads sharing a KV head are folded into the query length, so K/V are
    never repeated per query head; with one they are repeated (the mask is per query position).
    """
    _check(q, k, v, causal)
    t, hq, d = q.shape
    s, hkv, _ = k.shape
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    if causal:
        q4 = q.permute(1, 0, 2).unsqueeze(0).contiguous()  # (1, Hq, T, D)
        k4 = k.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0).contiguous()
        v4 = v.repeat_interleave(g, dim=1).permute(1, 0, 2).unsqueeze(0).contiguous()
        out, lse = _aten(q4, k4, v4, True, scale)
        return out[0].permute(1, 0, 2).float(), lse[0].transpose(0, 1).float()
    q4 = q.view(t, hkv, g, d).permute(1, 2, 0, 3).reshape(1, hkv, g * t, d).contiguous()  # rows: (group, token)
    k4 = k.permute(1, 0, 2).unsqueeze(0).contiguous()  # (1, Hkv, S, D)
    v4 = v.permute(1, 0, 2).unsqueeze(0).contiguous()
    out, lse = _aten(q4, k4, v4, False, scale)
    out = out[0].view(hkv, g, t, d).permute(2, 0, 1, 3).reshape(t, hq, d)
    return out.float(), lse[0].view(hkv, g, t).permute(2, 0, 1).reshape(t, hq).float()


def causal_gqa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of q (T, Hq, D) over its own k, v (T, Hkv, D) in one fused call without repeating K/V per
    query head (SDPA's grouped-query mode), in q's dtype: a layer-major prefill's whole-layer attention."""
    _check(q, k, v, True)
    out = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
                                                           v.transpose(0, 1).unsqueeze(0), is_causal=True,
                                                           enable_gqa=True)  # (1, Hq, T, D)
    return out[0].transpose(0, 1)


def span_attention(q, k, v, causal: bool = False, scale: float | None = None, *, impl: str | None = None):
    """Dispatching entry point: the fused ATen kernels unless impl="torch" (the reference)."""
    fn = span_attention_torch if impl == "torch" else span_attention_fused
    return fn(q, k, v, causal, scale)
