"""Shadow-keyed paged attention: the fused reference equals rebuild-then-attend; Triton matches the reference."""

import pytest
import torch

from tests.kernels.kutil import TOL, make_case, max_diff
from tierkv.kernels import paged_decode_attention_torch, rebuild_keys_torch
from tierkv.kernels.shadow_attention import shadow_paged_attention, shadow_paged_attention_torch


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("hq,hkv", [(8, 2), (9, 3)])
def test_fused_reference_equals_rebuild_then_attend(gen, dtype, layout, hq, hkv):
    d, r, chunk, m = 16, 4, 4, 6
    q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids = make_case(
        gen, hq, hkv, d, r, chunk, m, layout, dtype)
    fused = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids)
    k_pool2 = k_pool.clone()  # unfused: write rebuilt keys into the pool, then plain paged attention
    for h in range(hkv):
        for e in range(m):
            c = int(chunk_ids[h, e])
            if c >= 0:
                tok = torch.arange(c * chunk, (c + 1) * chunk)
                keys = rebuild_keys_torch(coeffs, basis, tok, cos, sin, out_dtype=dtype)  # (chunk, Hkv, D)
                k_pool2[int(slots[h, e]), :, h] = keys[:, h]
    unfused = paged_decode_attention_torch(q, k_pool2, v_pool, slots, lengths)
    assert max_diff(f"shadow fused vs unfused out {dtype}", fused[0], unfused[0]) < TOL[dtype] / 4
    assert max_diff(f"shadow fused vs unfused lse {dtype}", fused[1], unfused[1]) < 1e-5
    assert torch.equal(shadow_paged_attention(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids,
                                              impl="torch")[0], fused[0])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("hq,hkv,d,r,chunk,m", [(8, 2, 64, 8, 16, 5), (9, 3, 32, 20, 8, 13), (32, 8, 128, 32, 32, 20),
                                                 (8, 2, 64, 96, 16, 7),  # rank > 64: the sliced-basis path
                                                 (4, 1, 256, 96, 32, 9),  # Gemma 3's head: 32-key blocks on an H100
                                                 (4, 1, 256, 256, 16, 9)])  # its exact keys: 16-key blocks
def test_shadow_triton_matches_torch(gen, triton_device, dtype, layout, hq, hkv, d, r, chunk, m):
    from tierkv.kernels.shadow_attention_triton import shadow_paged_attention_triton

    args = list(make_case(gen, hq, hkv, d, r, chunk, m, layout, dtype, triton_device))
    if r > 32:  # real keys do not grow with the shadow's rank: keep rebuilt keys at the r = 32 case's scale
        args[2] = (args[2].float() * (32 / r) ** 0.5).to(args[2].dtype)
    got = shadow_paged_attention_triton(*args)
    want = shadow_paged_attention_torch(*args)
    assert max_diff(f"shadow triton out {layout} {dtype}", got[0], want[0]) < TOL[dtype]
    # bf16: a rebuilt key element may round to the neighbouring bf16 value (other summation order)
    assert max_diff(f"shadow triton lse {layout} {dtype}", got[1], want[1]) < (1e-3 if dtype == torch.float32 else 2e-2)


@pytest.mark.cuda
def test_a_block_too_large_for_shared_memory_falls_back_smaller(gen, monkeypatch):
    """An estimate that lets through a block this Triton build cannot stage (64 keys at head dim 256, rank 256: over
    an H100's shared memory) costs a retry, not an error: the launch halves the block, the result matches the
    reference, and later calls start at the block that fitted."""
    from tierkv.kernels import shadow_attention_triton as sat

    args = list(make_case(gen, 4, 1, 256, 256, 16, 9, "shared", torch.bfloat16, "cuda"))
    args[2] = (args[2].float() * (32 / 256) ** 0.5).to(args[2].dtype)
    monkeypatch.setattr(sat, "shadow_split_block_n", lambda *a: 64)
    monkeypatch.setattr(sat, "_MEASURED_BLOCKS", {})
    got = sat.shadow_paged_attention_triton(*args)
    want = shadow_paged_attention_torch(*args)
    assert max_diff("shadow triton out after the fallback", got[0], want[0]) < TOL[torch.bfloat16]
    (fitted,) = sat._MEASURED_BLOCKS.values()
    assert fitted in (16, 32)
    assert sat.shadow_block_n(args[0], torch.bfloat16, 256) == fitted


def test_rows_past_a_chunks_length_never_reach_the_output(gen):
    """Pool rows beyond each entry's length may be memory never written: NaN there must not leak (0 * NaN)."""
    from tierkv.kernels.shadow_attention import shadow_paged_attention_torch

    n, c, h, d, hq, r = 8, 4, 2, 8, 4, 3
    k_pool, v_pool = torch.randn(n, c, h, d, generator=gen), torch.randn(n, c, h, d, generator=gen)
    q, coeffs, basis = torch.randn(hq, d, generator=gen), torch.randn(40, r, generator=gen), torch.randn(r, h * d, generator=gen)
    ang = torch.outer(torch.arange(64).float(), torch.ones(d))
    slots = torch.tensor([[0, 1, 6, 7], [2, 3, 6, 5]])
    lengths = torch.tensor([[4, 4, 0, 0], [4, 2, 0, 0]])
    cids = torch.tensor([[-1, 1, -1, -1], [2, -1, -1, -1]])
    clean, _ = shadow_paged_attention_torch(q, coeffs, basis, ang.cos(), ang.sin(), k_pool, v_pool, slots, lengths, cids)
    k_pool[5:], v_pool[5:], v_pool[3, 2:] = float("nan"), float("nan"), float("nan")
    dirty, _ = shadow_paged_attention_torch(q, coeffs, basis, ang.cos(), ang.sin(), k_pool, v_pool, slots, lengths, cids)
    assert torch.equal(clean, dirty)


def resident_case(gen, v_pool, lo, r):
    """A GPU-resident copy of the pool's slots [lo, lo + r), and a pool whose copy of them is garbage: the op
    must read those slots' values from the resident copy only."""
    v_res = v_pool[lo:lo + r].clone()
    stale = v_pool.clone()
    stale[lo:lo + r] = torch.randn(v_res.shape, generator=gen).to(stale.dtype) * 100
    return v_res, stale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resident_values_replace_the_pools_first_slots(gen, dtype):
    d, r, chunk, m = 16, 4, 4, 6
    q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids = make_case(
        gen, 8, 2, d, r, chunk, m, "per_head", dtype)
    want, _ = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids)
    lo, n_res = 5, 12
    inside = (slots >= lo) & (slots < lo + n_res) & (lengths > 0)
    assert bool(inside.any()) and bool((~inside & (lengths > 0)).any())
    v_res, stale = resident_case(gen, v_pool, lo, n_res)
    got, _ = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, stale, slots, lengths, chunk_ids,
                                          v_resident=v_res, resident_from=lo)
    assert torch.equal(got, want)
    wrong, _ = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_pool, stale, slots, lengths, chunk_ids)
    assert max_diff("stale pool without the resident copy", wrong, want) > 1.0
    k_res, k_stale = resident_case(gen, k_pool, lo, n_res)  # exact keys (chunk id -1) of resident slots too
    assert bool((inside & (chunk_ids < 0)).any())
    got, _ = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, k_stale, stale, slots, lengths, chunk_ids,
                                          v_resident=v_res, resident_from=lo, k_resident=k_res)
    assert torch.equal(got, want)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lo,n_res", [(0, 1), (22, 1), (0, 12), (11, 12), (0, 23)])
@pytest.mark.parametrize("keys", [False, True])
def test_shadow_triton_reads_resident_values_as_torch_does(gen, triton_device, dtype, lo, n_res, keys):
    from tierkv.kernels.shadow_attention_triton import shadow_paged_attention_triton

    args = list(make_case(gen, 32, 8, 128, 32, 32, 20, "per_head", dtype, triton_device))
    v_res, stale = resident_case(gen, args[6], lo, n_res)
    args[6] = stale
    k_res = None
    if keys:
        k_res, args[5] = resident_case(gen, args[5], lo, n_res)
    got = shadow_paged_attention_triton(*args, v_resident=v_res, resident_from=lo, k_resident=k_res)
    want = shadow_paged_attention_torch(*args, v_resident=v_res, resident_from=lo, k_resident=k_res)
    assert max_diff(f"shadow triton out, {n_res} resident slots, {dtype}", got[0], want[0]) < TOL[dtype]
