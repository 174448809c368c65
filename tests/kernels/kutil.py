"""Shared helpers for kernel tests: random tensors, RoPE tables, max-difference reporting."""

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
