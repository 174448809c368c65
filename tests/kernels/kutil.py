"""Shared helpers for kernel tests: random tensors, RoPE tables, max-difference reporting, and random inputs (pools,
shadows, whole shadow-attention cases) that several kernel tests build."""

import torch


def randn(gen, *shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype=dtype, device=device)


def rope_tables(s_max: int, d: int, base: float = 10000.0, dtype=torch.float32):
    """Llama cos/sin tables (S_max, D) with the two halves repeated."""
    inv = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.outer(torch.arange(s_max, dtype=torch.float64), inv)  # (S_max, D/2)
    ang = torch.cat((ang, ang), dim=-1)  # (S_max, D)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def max_diff(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """Print and return the max absolute difference (inf-aware: equal infinities count as 0)."""
    g, w = got.double().cpu(), want.double().cpu()
    same_inf = torch.isinf(g) & torch.isinf(w) & (g == w)
    diff = torch.where(same_inf, torch.zeros_like(g), (g - w).abs())
    value = float(diff.max()) if diff.numel() else 0.0
    print(f"{name}: max abs diff {value:.3e}")
    return value


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


def make_pool(gen, hkv, d, chunk, num_slots, m, dtype, device="cpu"):
    """Random K/V pools (num_slots, chunk, Hkv, D), m picked slots per head and their lengths: the last pick an open
    (partial) chunk, and with m > 2 one skipped pick (length 0)."""
    k_pool = randn(gen, num_slots, chunk, hkv, d, dtype=dtype, device=device)  # (num_slots, chunk, Hkv, D)
    v_pool = randn(gen, num_slots, chunk, hkv, d, dtype=dtype, device=device)
    slots = torch.stack([torch.randperm(num_slots, generator=gen)[:m] for _ in range(hkv)]).to(device)  # (Hkv, m)
    lengths = torch.full((hkv, m), chunk, dtype=torch.int32)
    lengths[:, -1] = torch.randint(1, chunk, (hkv,), generator=gen)  # an open (partial) chunk
    if m > 2:
        lengths[0, 1] = 0  # a skipped pick
    return k_pool, v_pool, slots, lengths.to(device)


def make_shadow(gen, layout, hkv, s, r, d, dtype, device="cpu"):
    """Random low-rank key shadow (coeffs, basis) for s tokens at rank r: one basis for all heads ("shared") or one
    per head ("per_head")."""
    if layout == "shared":
        return randn(gen, s, r, dtype=dtype, device=device), randn(gen, r, hkv * d, dtype=dtype, device=device, scale=0.3)
    return randn(gen, hkv, s, r, dtype=dtype, device=device), randn(gen, hkv, r, d, dtype=dtype, device=device, scale=0.3)


def make_case(gen, hq, hkv, d, r, chunk, m, layout, dtype, device="cpu"):
    """Inputs of shadow_paged_attention over 23 chunks: q, shadow, RoPE tables, pools, slots, lengths and chunk ids
    (-1 where keys are exact: a sink and the open window chunk)."""
    n_chunks = 23
    s = n_chunks * chunk
    k_pool, v_pool, slots, lengths = make_pool(gen, hkv, d, chunk, n_chunks, m, dtype, device)
    coeffs, basis = make_shadow(gen, layout, hkv, s, r, d, dtype, device)
    cos, sin = (t.to(device) for t in rope_tables(s, d))
    chunk_ids = torch.stack([torch.randperm(n_chunks, generator=gen)[:m] for _ in range(hkv)])  # (Hkv, m)
    chunk_ids[:, 0] = -1  # a sink with exact keys
    chunk_ids[:, -1] = -1  # the open window chunk, exact
    q = randn(gen, hq, d, dtype=dtype, device=device)
    return q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids.to(device)
