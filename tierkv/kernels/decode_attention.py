"""Decode attention for one query token over gathered K/V, grouped-query heads, returning the log-sum-exp.

Torch references: dense K/V, K/V read from a chunk pool by slot list (sinks + picks + window in one list),
and `merge_partials` to combine results over disjoint key sets. Triton twins: decode_attention_triton.py.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch


def _attend(s: torch.Tensor, v: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """s (Hkv, G, n) fp32 scores (-inf = masked), v (Hkv, n, D) -> out (Hkv*G, D), lse (Hkv*G,) fp32."""
    lse = torch.logsumexp(s, dim=-1)  # (Hkv, G)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)  # a fully masked row gives out 0, lse -inf
    p = torch.exp(s - safe.unsqueeze(-1))  # (Hkv, G, n)
    out = torch.bmm(p, v.float())  # (Hkv, G, D)
    return out.flatten(0, 1).to(out_dtype), lse.flatten()


def decode_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None = None, scale: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (Hq, D) over k, v (n, Hkv, D); query head g uses KV head g // (Hq // Hkv).

    kv_len: optional (Hkv,) int tensor, KV head h attends to rows [0, kv_len[h]). scale defaults to D**-0.5.
    Returns out (Hq, D) in q.dtype and lse (Hq,) fp32 (natural log; -inf and out 0 where nothing is attended).
    Computes in fp32; no host sync, nothing mutated.
    """
    hq, d = q.shape
    n, hkv, _ = k.shape
    scale = d**-0.5 if scale is None else scale
    qf = q.float().view(hkv, hq // hkv, d)  # (Hkv, G, D)
    s = torch.bmm(qf, k.float().permute(1, 2, 0)) * scale  # (Hkv, G, n)
    vh = v.transpose(0, 1)  # (Hkv, n, D)
    if kv_len is not None:
        keep = torch.arange(n, device=k.device) < kv_len.unsqueeze(1)  # (Hkv, n)
        s = s.masked_fill(~keep.unsqueeze(1), float("-inf"))
        vh = vh.masked_fill(~keep.unsqueeze(-1), 0)  # rows never written may hold NaN: 0 * NaN would leak
    return _attend(s, vh, q.dtype)


def paged_decode_attention_torch(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (Hq, D) over chunks read from pools k_pool, v_pool (num_slots, chunk, Hkv, D).

    slots: (Hkv, m) int, the pool slots KV head h attends (sinks + picks + window as one list; order free).
    lengths: (Hkv, m) int, valid tokens of each listed chunk (chunk for sealed, fewer for the open one, 0 to skip).
    Returns out (Hq, D) in q.dtype and lse (Hq,) fp32, as `decode_attention_torch`. No host sync.
    """
    hq, d = q.shape
    _, chunk, hkv, _ = k_pool.shape
    m = slots.shape[1]
    scale = d**-0.5 if scale is None else scale
    heads = torch.arange(hkv, device=slots.device).unsqueeze(1)  # (Hkv, 1)
    kg = k_pool.permute(2, 0, 1, 3)[heads, slots].reshape(hkv, m * chunk, d)  # (Hkv, m*chunk, D)
    vg = v_pool.permute(2, 0, 1, 3)[heads, slots].reshape(hkv, m * chunk, d)  # (Hkv, m*chunk, D)
    return attend_chunks(q, kg, vg, lengths, chunk, scale)


def attend_chunks(q, kg, vg, lengths, chunk: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (Hq, D) over per-head gathered chunks kg, vg (Hkv, m*chunk, D), entry e valid for j < lengths[h, e]."""
    hq, d = q.shape
    hkv, n, _ = kg.shape
    qf = q.float().view(hkv, hq // hkv, d)  # (Hkv, G, D)
    s = torch.bmm(qf, kg.float().transpose(1, 2)) * scale  # (Hkv, G, m*chunk)
    keep = (torch.arange(chunk, device=kg.device) < lengths.unsqueeze(-1)).reshape(hkv, n)
    s = s.masked_fill(~keep.unsqueeze(1), float("-inf"))
    # rows past a chunk's length may be memory never written (NaN bit patterns): 0 * NaN would leak into out
    return _attend(s, vg.masked_fill(~keep.unsqueeze(-1), 0), q.dtype)


def merge_partials_torch(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attention over P disjoint key sets: outs (P, Hq, D), lses (P, Hq) -> out (Hq, D), lse (Hq,).

    Exact: equals attention over the union. A part with lse -inf contributes nothing. out in outs.dtype.
    """
    m = lses.float().amax(dim=0)  # (Hq,)
    safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(lses.float() - safe)  # (P, Hq)
    total = w.sum(dim=0)  # (Hq,)
    out = (w.unsqueeze(-1) * outs.float()).sum(dim=0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return out.to(outs.dtype), torch.log(total) + safe


def decode_attention(q, k, v, kv_len=None, scale=None, *, impl: str | None = None):
    """Dispatching entry point: see `decode_attention_torch`."""
    return dispatch.get("decode_attention", q.device, impl)(q, k, v, kv_len, scale)


def paged_decode_attention(q, k_pool, v_pool, slots, lengths, scale=None, *, impl: str | None = None):
    """Dispatching entry point: see `paged_decode_attention_torch`."""
    fn = dispatch.get("paged_decode_attention", q.device, impl, module="decode_attention")
    return fn(q, k_pool, v_pool, slots, lengths, scale)


def merge_partials(outs, lses, *, impl: str | None = None):
    """Dispatching entry point: see `merge_partials_torch`."""
    return dispatch.get("merge_partials", outs.device, impl, module="decode_attention")(outs, lses)
