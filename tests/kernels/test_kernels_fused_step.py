"""The fused step kernels (add+RMSNorm, q/k RoPE, SiLU*up): references against naive maths, Triton against
the references (on CUDA, or the CPU under TRITON_INTERPRET=1)."""

from __future__ import annotations

import math

import pytest
import torch

from tierkv.kernels.norm import add_rms_norm_torch
from tierkv.kernels.qk_rope import qk_rope_torch
from tierkv.kernels.silu_mul import silu_mul_torch


def _tables(s: int, d: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).double() / d))
    ang = torch.outer(torch.arange(s).double(), inv)
    emb = torch.cat([ang, ang], -1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def test_references_match_naive_maths():
    g = torch.Generator().manual_seed(0)
    h, delta = (torch.randn(3, 40, generator=g, dtype=torch.float64) for _ in range(2))
    w = torch.randn(40, generator=g, dtype=torch.float64)
    h2, y = add_rms_norm_torch(h, delta, w, 1e-5)
    x = h + delta
    assert torch.allclose(h2, x)
    assert torch.allclose(y, w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5))
    hq, hkv, d = 4, 2, 8
    qkv = torch.randn(5, (hq + 2 * hkv) * d, generator=g, dtype=torch.float64)
    cos, sin = _tables(64, d, torch.float64)
    pos = torch.tensor([0, 3, 7, 8, 63])
    q, k, k_pre = qk_rope_torch(qkv, cos, sin, pos, hq, hkv)
    for t in range(5):  # rotate each (x_i, x_{i+D/2}) pair by angle pos * inv_freq_i
        for i in range(d // 2):
            a = pos[t].item() / 10000 ** (2 * i / d)
            x1, x2 = qkv[t, i], qkv[t, i + d // 2]  # head 0 of q
            assert math.isclose(q[t, 0, i].item(), x1 * math.cos(a) - x2 * math.sin(a), abs_tol=1e-9)
            assert math.isclose(q[t, 0, i + d // 2].item(), x2 * math.cos(a) + x1 * math.sin(a), abs_tol=1e-9)
    assert torch.equal(k_pre, qkv[:, hq * d:(hq + hkv) * d].view(5, hkv, d))
    gu = torch.randn(2, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(silu_mul_torch(gu), gu[:, :3] * torch.sigmoid(gu[:, :3]) * gu[:, 3:])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_reference(triton_device, dtype):
    from tierkv.kernels.norm_triton import add_rms_norm_triton
    from tierkv.kernels.qk_rope_triton import qk_rope_triton
    from tierkv.kernels.silu_mul_triton import silu_mul_triton

    if triton_device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter mishandles bf16")
    dev = triton_device
    g = torch.Generator().manual_seed(1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for rows, n in ((1, 4096), (3, 576), (2, 100)):
        h, delta = (torch.randn(rows, n, generator=g).to(dev, dtype) for _ in range(2))
        w = torch.randn(n, generator=g).to(dev, dtype)
        for d_ in (delta, None):
            ref, got = add_rms_norm_torch(h, d_, w, 1e-5), add_rms_norm_triton(h, d_, w, 1e-5)
            for a, b in zip(ref, got):
                err = (a.float() - b.float()).abs().max().item()
                print(f"add_rms_norm {rows}x{n} {dtype}: {err:.2e}")
                assert err <= tol * max(1.0, a.float().abs().max().item())
    for hq, hkv, d in ((32, 8, 128), (9, 3, 64)):
        qkv = torch.randn(3, (hq + 2 * hkv) * d, generator=g).to(dev, dtype)
        cos, sin = (t.to(dev) for t in _tables(512, d, dtype))
        pos = torch.tensor([5, 200, 511], device=dev)
        for a, b in zip(qk_rope_torch(qkv, cos, sin, pos, hq, hkv), qk_rope_triton(qkv, cos, sin, pos, hq, hkv)):
            err = (a.float() - b.float()).abs().max().item()
            print(f"qk_rope {hq}/{hkv}x{d} {dtype}: {err:.2e}")
            assert err <= tol * 4
    gu = torch.randn(2, 2 * 1500, generator=g).to(dev, dtype)
    err = (silu_mul_torch(gu).float() - silu_mul_triton(gu).float()).abs().max().item()
    print(f"silu_mul {dtype}: {err:.2e}")
    assert err <= tol * 4
