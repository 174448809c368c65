"""rebuild_keys and rope: torch references against naive float64 loops; Triton against the references."""

import pytest
import torch

from tests.kernels.kutil import TOL, make_shadow, max_diff, randn, rope_tables
from tierkv.errors import ConfigError
from tierkv.kernels import dispatch, implementation, rebuild_keys, rebuild_keys_torch, rope_torch


def naive_rope(x, cos, sin, pos):
    """x (D,) float64 at one position: x*cos + rotate_half(x)*sin written out element by element."""
    d = x.shape[0]
    half = d // 2
    out = torch.empty_like(x)
    for i in range(d):
        rot = -x[i + half] if i < half else x[i - half]
        out[i] = x[i] * cos[pos, i] + rot * sin[pos, i]
    return out


def naive_keys(coeffs, basis, idx2, cos, sin, d):
    hkv, n = idx2.shape
    out = torch.empty(n, hkv, d, dtype=torch.float64)
    a, b = coeffs.double(), basis.double()
    for h in range(hkv):
        for i in range(n):
            t = int(idx2[h, i])
            pre = a[t] @ b[:, h * d:(h + 1) * d] if a.dim() == 2 else a[h, t] @ b[h]
            out[i, h] = naive_rope(pre, cos.double(), sin.double(), t)
    return out


def test_rope_matches_naive(gen):
    cos, sin = rope_tables(64, 8)
    x = randn(gen, 5, 3, 8)
    pos = torch.tensor([0, 7, 63, 2, 2])
    got = rope_torch(x, cos, sin, pos)
    want = torch.stack([torch.stack([naive_rope(x[i, h].double(), cos.double(), sin.double(), int(pos[i]))
                                     for h in range(3)]) for i in range(5)])
    assert max_diff("rope", got, want) < 1e-5
    per_head = rope_torch(x, cos, sin, pos.expand(3, -1))
    assert torch.equal(per_head, got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("per_head_idx", [False, True])
def test_rebuild_keys_matches_naive(gen, dtype, layout, per_head_idx):
    hkv, s, r, d, n = 3, 50, 6, 8, 7
    coeffs, basis = make_shadow(gen, layout, hkv, s, r, d, dtype)
    cos, sin = rope_tables(s, d)
    idx = torch.randint(0, s, (hkv, n) if per_head_idx else (n,), generator=gen)
    got = rebuild_keys_torch(coeffs, basis, idx, cos, sin)
    assert got.shape == (n, hkv, d) and got.dtype == dtype
    want = naive_keys(coeffs, basis, idx.expand(hkv, -1), cos, sin, d)
    assert max_diff(f"rebuild_keys {layout} {dtype}", got, want) < TOL[dtype] * 4


def test_rebuild_keys_positions_and_out_dtype(gen):
    hkv, s, r, d = 2, 20, 4, 8
    coeffs, basis = make_shadow(gen, "shared", hkv, s, r, d, torch.float32)
    cos, sin = rope_tables(64, d)
    idx = torch.tensor([3, 1, 4])
    shifted = rebuild_keys_torch(coeffs, basis, idx, cos, sin, positions=idx + 10, out_dtype=torch.bfloat16)
    assert shifted.dtype == torch.bfloat16
    pre = (coeffs[idx] @ basis).view(3, hkv, d)  # (n, Hkv, D)
    assert max_diff("positions", shifted, rope_torch(pre, cos, sin, idx + 10)) < 3e-2


def test_dispatch_cpu_is_torch_and_can_be_forced():
    assert dispatch.resolve("cpu") == "torch"
    assert implementation("cpu") == "torch"
    with pytest.raises(ConfigError):
        dispatch.resolve("cpu", "cuda-magic")
    assert dispatch.get("rebuild_keys", "cpu") is rebuild_keys_torch


def test_dispatching_entry_point(gen):
    coeffs, basis = make_shadow(gen, "shared", 2, 16, 4, 8, torch.float32)
    cos, sin = rope_tables(16, 8)
    idx = torch.tensor([0, 5, 15])
    assert torch.equal(rebuild_keys(coeffs, basis, idx, cos, sin, impl="torch"),
                       rebuild_keys_torch(coeffs, basis, idx, cos, sin))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("hkv,r,d,n", [(2, 8, 64, 37), (3, 32, 128, 100), (8, 20, 32, 5)])
def test_rebuild_keys_triton_matches_torch(gen, triton_device, dtype, layout, hkv, r, d, n):
    from tierkv.kernels.rebuild_keys_triton import rebuild_keys_triton

    s = 300
    coeffs, basis = make_shadow(gen, layout, hkv, s, r, d, dtype, triton_device)
    cos, sin = (t.to(triton_device) for t in rope_tables(s, d))
    for idx in (torch.randint(0, s, (n,), generator=gen), torch.randint(0, s, (hkv, n), generator=gen)):
        idx = idx.to(triton_device)
        got = rebuild_keys_triton(coeffs, basis, idx, cos, sin)
        want = rebuild_keys_torch(coeffs, basis, idx, cos, sin)
        assert max_diff(f"rebuild_keys triton {layout} {dtype}", got, want) < TOL[dtype] * 4
