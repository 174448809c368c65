"""append_token: the torch reference against the unfused writes it replaces; the Triton twin against it."""

import pytest
import torch

from tierkv.kernels.append_token import append_token_torch, quantize_rows


def case(gen, hkv=3, d=64, r=20, s_cap=40, rows=9, ring=11, dtype=torch.float32, device="cpu"):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)

    k, v, k_pre = rnd(1, hkv, d), rnd(1, hkv, d), rnd(1, hkv, d)
    bufs = [rnd(s_cap, hkv, d), rnd(s_cap, hkv, d), rnd(rows, hkv, d), rnd(ring, hkv, d), rnd(rows, hkv, d)]
    basis = rnd(hkv, r, d)
    coeffs = torch.randint(-127, 128, (hkv, s_cap, r), generator=gen, dtype=torch.int8).to(device)
    row_scale = torch.rand(hkv, s_cap, generator=gen).to(device)
    at, pool_at, res_at, ring_at = (torch.tensor([x], device=device) for x in (17, 23, 4, 10))
    return [k, v, k_pre, at, pool_at, bufs[0], bufs[1], bufs[4], bufs[2], res_at, bufs[3], ring_at, basis, coeffs, row_scale]


def test_reference_writes_every_buffer_at_its_position_and_nothing_else(gen):
    args = case(gen)
    k, v, k_pre, at, pool_at, k_pool, v_pool, k_res, v_res, res_at, ring, ring_at, basis, coeffs, row_scale = args
    before = [t.clone() for t in (k_pool, v_pool, v_res, ring, coeffs, row_scale, k_res)]
    append_token_torch(*args)
    for buf, old, pos, want in ((k_pool, before[0], 23, k[0]), (v_pool, before[1], 23, v[0]), (v_res, before[2], 4, v[0]),
                                (ring, before[3], 10, k_pre[0]), (k_res, before[6], 4, k[0])):
        assert torch.equal(buf[pos], want)
        keep = torch.arange(buf.shape[0]) != pos
        assert torch.equal(buf[keep], old[keep])
    exact = torch.einsum("hd,hrd->hr", k[0].double(), basis.double())  # (Hkv, r)
    deq = coeffs[:, 17].double() * row_scale[:, 17, None].double()
    assert ((deq - exact).abs() <= row_scale[:, 17, None] / 2 + 1e-5).all()
    assert (coeffs[:, 17].abs().amax(-1) == 127).all()  # the scale is each row's absmax / 127
    keep = torch.arange(coeffs.shape[1]) != 17
    assert torch.equal(coeffs[:, keep], before[4][:, keep]) and torch.equal(row_scale[:, keep], before[5][:, keep])


def test_quantize_rows_rounds_ties_to_even_and_keeps_zero_rows():
    a = torch.tensor([[127.0, 0.5, 1.5, -2.5], [0.0, 0.0, 0.0, 0.0]])
    q, s = quantize_rows(a)
    assert q.tolist() == [[127, 0, 2, -2], [0, 0, 0, 0]] and s.tolist() == [1.0, 1.0]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv,d,r", [(3, 64, 20), (8, 128, 48), (2, 32, 16)])
@pytest.mark.parametrize("keep_keys", [False, True])
def test_append_token_triton_matches_torch(gen, triton_device, dtype, hkv, d, r, keep_keys):
    from tierkv.kernels.append_token_triton import append_token_triton

    want = case(gen, hkv, d, r, dtype=dtype, device=triton_device)
    if not keep_keys:
        want[7] = None
    got = [None if t is None else t.clone() for t in want]
    append_token_torch(*want)
    append_token_triton(*got)
    for i in (5, 6, 7, 8, 10):  # K/V pools, resident K and V, ring: copies, exact
        assert (got[i] is None and want[i] is None) or torch.equal(got[i], want[i])
    assert torch.allclose(got[14], want[14], rtol=1e-5, atol=0)  # row scales: the fp32 sum order may differ
    diff = (got[13].int() - want[13].int()).abs()
    print("int8 index row, max diff", int(diff.max()))
    assert int(diff.max()) <= 1 and int((diff > 0).sum()) <= max(1, diff.numel() // 50)
