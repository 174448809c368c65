"""Decode attention over pooled chunks whose keys are rebuilt from the low-rank shadow inside the op.

Entries with chunk_ids >= 0 get keys RoPE(A[t] @ B) at t = chunk_id*chunk + j; entries with chunk_ids < 0
(sinks, window, outliers) read exact keys from k_pool. Values come from v_pool, or, with a GPU chunk cache
(kernels/chunk_cache.py, filled before this runs), picks' keys and values come from their cache slots; with
values (and optionally exact keys) resident on the GPU for a run of the pool's slots (v_resident, k_resident),
entries in those slots read them there.
Triton twin fuses it all.
"""

from __future__ import annotations

import torch

from tierkv.kernels import dispatch
from tierkv.kernels.chunk_cache import cache_slots
from tierkv.kernels.decode_attention import attend_chunks
from tierkv.kernels.rebuild_keys import rebuild_keys_torch


def shadow_paged_attention_torch(
    q: torch.Tensor,
    coeffs: torch.Tensor,
    basis: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    slots: torch.Tensor,
    lengths: torch.Tensor,
    chunk_ids: torch.Tensor,
    scale: float | None = None,
    cache: tuple[torch.Tensor, ...] | None = None,
    v_resident: torch.Tensor | None = None,
    resident_from: int = 0,
    k_resident: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of q (Hq, D) over the listed chunks; returns out (Hq, D) in q.dtype, lse (Hq,) fp32.

    coeffs/basis: the shadow as in `rebuild_keys_torch`. k_pool/v_pool: (num_slots, chunk, Hkv, D).
    slots, lengths, chunk_ids: (Hkv, m) int, as in `paged_decode_attention_torch` plus where each key comes from.
    cache: None, or (k_cache, v_cache, csrc): caches (S + 1, chunk, Hkv, D) (slot S scratch) and csrc (Hkv, K)
    from `chunk_cache_assign` for the last K entries; picks with a slot (csrc != -1) are read from the caches.
    v_resident: None, or (R, chunk, Hkv, D) on the GPU, a copy of v_pool's slots [resident_from, resident_from + R):
    entries in those slots read their values there (same bytes, no host-link traffic when v_pool is mapped host
    memory); k_resident: None or v_resident's twin for k_pool, read for those slots' exact keys.
    Rebuilt keys are rounded to k_pool.dtype before the dot, as a gather-then-attend path would. No host sync.
    """
    _, chunk, hkv, d = k_pool.shape
    m = slots.shape[1]
    scale = d**-0.5 if scale is None else scale
    heads = torch.arange(hkv, device=slots.device).unsqueeze(1)  # (Hkv, 1)
    last = coeffs.shape[-2] - 1
    tok = (chunk_ids.clamp_min(0).unsqueeze(-1) * chunk + torch.arange(chunk, device=slots.device)).clamp_max(last)
    rebuilt = rebuild_keys_torch(coeffs, basis, tok.reshape(hkv, m * chunk), cos, sin, out_dtype=k_pool.dtype)
    exact = k_pool.permute(2, 0, 1, 3)[heads, slots]  # (Hkv, m, chunk, D)
    vg = v_pool.permute(2, 0, 1, 3)[heads, slots]
    if v_resident is not None and v_resident.shape[0]:
        rel = slots - resident_from
        on_gpu = ((rel >= 0) & (rel < v_resident.shape[0]))[..., None, None]
        rel = rel.clamp(0, v_resident.shape[0] - 1)
        vg = torch.where(on_gpu, v_resident.permute(2, 0, 1, 3)[heads, rel], vg)
        if k_resident is not None:
            exact = torch.where(on_gpu, k_resident.permute(2, 0, 1, 3)[heads, rel], exact)
    if cache is not None:
        exact, vg = _through_cache(exact, vg, cache)
    use_exact = (chunk_ids < 0).repeat_interleave(chunk, dim=1).unsqueeze(-1)  # (Hkv, m*chunk, 1)
    kg = torch.where(use_exact, exact.reshape(hkv, m * chunk, d), rebuilt.transpose(0, 1))  # (Hkv, m*chunk, D)
    return attend_chunks(q, kg, vg.reshape(hkv, m * chunk, d), lengths, chunk, scale)


def _through_cache(exact, vg, cache):
    """Picks with a cache slot take their keys and values from the caches."""
    k_cache, v_cache, csrc = cache
    hkv, m = vg.shape[:2]
    lead = torch.full((hkv, m - csrc.shape[1]), -1, dtype=csrc.dtype, device=csrc.device)  # fixed entries
    src = torch.cat([lead, csrc], dim=1)  # (Hkv, m)
    slot, _ = cache_slots(src, k_cache.shape[0] - 1)
    heads = torch.arange(hkv, device=vg.device).unsqueeze(1)
    cached = (src != -1)[..., None, None]
    return (torch.where(cached, k_cache.permute(2, 0, 1, 3)[heads, slot], exact),
            torch.where(cached, v_cache.permute(2, 0, 1, 3)[heads, slot], vg))


def shadow_paged_attention(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids, scale=None,
                           cache=None, v_resident=None, resident_from=0, k_resident=None, *, impl=None):
    """Dispatching entry point: see `shadow_paged_attention_torch`."""
    fn = dispatch.get("shadow_paged_attention", q.device, impl, module="shadow_attention")
    return fn(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids, scale, cache, v_resident,
              resident_from, k_resident)
