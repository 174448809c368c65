"""Decode attention (dense, paged), merge_partials: references against naive float64; Triton against references."""

import math

import pytest
import torch

from tests.kernels.kutil import TOL, make_pool, max_diff, randn
from tierkv.kernels import decode_attention_torch, merge_partials, merge_partials_torch, paged_decode_attention_torch

SHAPES = [(8, 2, 16), (9, 3, 8), (4, 4, 32)]  # (Hq, Hkv, D)


def naive_attention(q, keys_per_head, vals_per_head):
    """q (Hq, D); keys/vals: per KV head a (n_h, D) tensor. float64 softmax per query head."""
    hq, d = q.shape
    hkv = len(keys_per_head)
    out = torch.zeros(hq, d, dtype=torch.float64)
    lse = torch.full((hq,), float("-inf"), dtype=torch.float64)
    for g in range(hq):
        k, v = keys_per_head[g // (hq // hkv)].double(), vals_per_head[g // (hq // hkv)].double()
        if k.shape[0] == 0:
            continue
        s = (k @ q[g].double()) / math.sqrt(d)
        lse[g] = torch.logsumexp(s, 0)
        out[g] = torch.softmax(s, 0) @ v
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_dense_matches_naive(gen, dtype, hq, hkv, d):
    n = 37
    q, k, v = randn(gen, hq, d, dtype=dtype), randn(gen, n, hkv, d, dtype=dtype), randn(gen, n, hkv, d, dtype=dtype)
    out, lse = decode_attention_torch(q, k, v)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == (hq, d) and lse.shape == (hq,)
    want_out, want_lse = naive_attention(q, [k[:, h] for h in range(hkv)], [v[:, h] for h in range(hkv)])
    assert max_diff(f"dense out {dtype}", out, want_out) < TOL[dtype]
    assert max_diff(f"dense lse {dtype}", lse, want_lse) < 1e-4


def test_dense_kv_len_and_empty_head(gen):
    hq, hkv, d, n = 6, 3, 8, 11
    q, k, v = randn(gen, hq, d), randn(gen, n, hkv, d), randn(gen, n, hkv, d)
    kv_len = torch.tensor([11, 4, 0])
    out, lse = decode_attention_torch(q, k, v, kv_len)
    want_out, want_lse = naive_attention(q, [k[: int(L), h] for h, L in enumerate(kv_len)],
                                         [v[: int(L), h] for h, L in enumerate(kv_len)])
    assert max_diff("kv_len out", out, want_out) < 2e-5
    assert max_diff("kv_len lse", lse, want_lse) < 1e-4
    assert torch.all(out[4:] == 0) and torch.all(torch.isneginf(lse[4:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_partials_equals_unsplit(gen, dtype):
    hq, hkv, d, n = 9, 3, 16, 50
    q, k, v = randn(gen, hq, d, dtype=dtype), randn(gen, n, hkv, d, dtype=dtype), randn(gen, n, hkv, d, dtype=dtype)
    full_out, full_lse = decode_attention_torch(q, k, v)
    cuts = [0, 7, 7, 31, 50]  # uneven parts, one empty
    parts = [decode_attention_torch(q, k[a:b], v[a:b]) for a, b in zip(cuts, cuts[1:])]
    outs = torch.stack([p[0] for p in parts]).float()  # (P, Hq, D)
    lses = torch.stack([p[1] for p in parts])  # (P, Hq)
    out, lse = merge_partials_torch(outs, lses)
    assert max_diff(f"merge out {dtype}", out, full_out) < TOL[dtype]
    assert max_diff(f"merge lse {dtype}", lse, full_lse) < 1e-4
    assert torch.equal(merge_partials(outs, lses, impl="torch")[0], out)


def test_merge_partials_all_empty():
    outs, lses = torch.zeros(3, 4, 8), torch.full((3, 4), float("-inf"))
    out, lse = merge_partials_torch(outs, lses)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_paged_matches_naive(gen, dtype, hq, hkv, d):
    chunk, num_slots, m = 4, 13, 5
    k_pool, v_pool, slots, lengths = make_pool(gen, hkv, d, chunk, num_slots, m, dtype)
    q = randn(gen, hq, d, dtype=dtype)
    out, lse = paged_decode_attention_torch(q, k_pool, v_pool, slots, lengths)
    keys = [torch.cat([k_pool[int(s), : int(L), h] for s, L in zip(slots[h], lengths[h])]) for h in range(hkv)]
    vals = [torch.cat([v_pool[int(s), : int(L), h] for s, L in zip(slots[h], lengths[h])]) for h in range(hkv)]
    want_out, want_lse = naive_attention(q, keys, vals)
    assert max_diff(f"paged out {dtype}", out, want_out) < TOL[dtype]
    assert max_diff(f"paged lse {dtype}", lse, want_lse) < 1e-4


def test_fused_gather_equals_unfused(gen):
    """Reading chunks by slot inside attention equals gathering tokens first, then dense attention."""
    hq, hkv, d, chunk, num_slots, m = 8, 2, 16, 8, 11, 3
    k_pool, v_pool, slots, _ = make_pool(gen, hkv, d, chunk, num_slots, m, torch.float32)
    lengths = torch.full((hkv, m), chunk)
    q = randn(gen, hq, d)
    fused = paged_decode_attention_torch(q, k_pool, v_pool, slots, lengths)
    heads = torch.arange(hkv).unsqueeze(1)
    k = k_pool.permute(2, 0, 1, 3)[heads, slots].reshape(hkv, m * chunk, d).transpose(0, 1)  # (n, Hkv, D)
    v = v_pool.permute(2, 0, 1, 3)[heads, slots].reshape(hkv, m * chunk, d).transpose(0, 1)  # (n, Hkv, D)
    unfused = decode_attention_torch(q, k, v)
    assert max_diff("fused vs unfused out", fused[0], unfused[0]) < 1e-6
    assert max_diff("fused vs unfused lse", fused[1], unfused[1]) < 1e-6


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,n", [(8, 2, 64, 37), (9, 3, 32, 300), (32, 8, 128, 2048), (4, 4, 16, 1),
                                        (4, 1, 256, 600)])  # Gemma 3's head: smaller blocks where shared memory ends
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_dense_triton_matches_torch(gen, triton_device, dtype, hq, hkv, d, n, splits):
    from tierkv.kernels.decode_attention_triton import decode_attention_triton

    dev = triton_device
    q, k, v = (randn(gen, *s, dtype=dtype, device=dev) for s in ((hq, d), (n, hkv, d), (n, hkv, d)))
    kv_len = torch.randint(0, n + 1, (hkv,), generator=gen).to(dev)
    for lens in (None, kv_len):
        got = decode_attention_triton(q, k, v, lens, num_splits=splits)
        want = decode_attention_torch(q, k, v, lens)
        assert max_diff(f"dense triton out {dtype}", got[0], want[0]) < TOL[dtype]
        assert max_diff(f"dense triton lse {dtype}", got[1], want[1]) < 1e-3


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d,chunk,m", [(8, 2, 64, 32, 5), (9, 3, 32, 16, 17), (32, 8, 128, 32, 64),
                                              (4, 1, 256, 32, 20)])
def test_paged_triton_matches_torch(gen, triton_device, dtype, hq, hkv, d, chunk, m):
    from tierkv.kernels.decode_attention_triton import paged_decode_attention_triton

    k_pool, v_pool, slots, lengths = make_pool(gen, hkv, d, chunk, m + 7, m, dtype, triton_device)
    q = randn(gen, hq, d, dtype=dtype, device=triton_device)
    got = paged_decode_attention_triton(q, k_pool, v_pool, slots, lengths)
    want = paged_decode_attention_torch(q, k_pool, v_pool, slots, lengths)
    assert max_diff(f"paged triton out {dtype}", got[0], want[0]) < TOL[dtype]
    assert max_diff(f"paged triton lse {dtype}", got[1], want[1]) < 1e-3


@pytest.mark.cuda
def test_merge_partials_triton_matches_torch(gen, triton_device):
    from tierkv.kernels.decode_attention_triton import merge_partials_triton

    outs, lses = randn(gen, 5, 9, 32, device=triton_device), randn(gen, 5, 9, device=triton_device, scale=3.0)
    lses[1, :4] = float("-inf")
    lses[:, 8] = float("-inf")
    got, want = merge_partials_triton(outs, lses), merge_partials_torch(outs, lses)
    assert max_diff("merge triton out", got[0], want[0]) < 1e-5
    assert max_diff("merge triton lse", got[1], want[1]) < 1e-5


@pytest.mark.parametrize("limit,d,elt,factor,want", [
    (232448, 128, 2, 8, 64),  # H100, Llama head, bf16 shadow kernel: unchanged
    (232448, 256, 2, 8, 32),  # H100, Gemma 3 head: 64 keys needed 258,560 bytes
    (232448, 256, 4, 5, 32),  # H100, Gemma 3 head, fp32 dense kernel: 64 keys needed 282,688 bytes
    (101376, 128, 2, 8, 32),  # a card with ~100 KiB per SM (RTX 4090), Llama head
    (101376, 256, 4, 8, None),  # no block fits: the torch reference runs
    (232448, 256, 4, 8, None),  # the shadow kernel in fp32 on an H100 (it failed at 16 keys too)
])
def test_split_blocks_shrink_to_fit_shared_memory(monkeypatch, limit, d, elt, factor, want):
    from tierkv.kernels import split_blocks

    monkeypatch.setattr(split_blocks, "_shared_memory_limit", lambda device: limit)
    assert split_blocks.split_block_n(torch.device("cuda"), d, elt, factor) == want


@pytest.mark.parametrize("limit,d,rank,elt,want", [
    (232448, 128, 96, 2, 64),  # H100, Llama 3.1 8B's shadow (bf16): ~178 KB compiled at 64 keys
    (232448, 256, 96, 2, 32),  # H100, Gemma 3 at rank 96
    (232448, 256, 256, 2, 16),  # H100, Gemma 3's exact keys: 32 keys compile to ~263 KB with the larger basis
    (101376, 128, 96, 2, 32),  # RTX 4090, Llama 3.1 8B: 32 keys as before (~99 KB compiled)
    (232448, 256, 96, 4, None),  # fp32 at head dim 256 on an H100: no block fits (16 keys failed there too)
    (101376, 256, 256, 2, None),  # RTX 4090, Gemma 3's exact keys: the torch reference
])
def test_shadow_blocks_count_the_basis(monkeypatch, limit, d, rank, elt, want):
    from tierkv.kernels import split_blocks

    monkeypatch.setattr(split_blocks, "_shared_memory_limit", lambda device: limit)
    assert split_blocks.shadow_split_block_n(torch.device("cuda"), d, rank, elt) == want
