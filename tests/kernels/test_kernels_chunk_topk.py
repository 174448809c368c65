"""Low-rank chunk scoring + top-k: the torch reference against naive float64 loops; Triton against it."""

import math

import pytest
import torch

from tests.kernels.kutil import max_diff, randn
from tierkv.kernels import chunk_topk, chunk_topk_torch
from tierkv.kernels.chunk_topk import chunk_scores_torch


def naive_chunk_scores(q_low, coeffs, n_tokens, chunk, scale, reduce):
    """(Hkv, C) float64: per chunk, the reduced (for mass, normalised) score of each query head, then the max over
    the group, or for group-mass the log of the shares summed over the group."""
    hkv, g, _ = q_low.shape
    s_cap = coeffs.shape[-2]
    c = math.ceil(s_cap / chunk)
    out = torch.full((hkv, g, c), float("-inf"), dtype=torch.float64)
    for h in range(hkv):
        a = (coeffs if coeffs.dim() == 2 else coeffs[h]).double()
        for j in range(g):
            s = (a[:n_tokens] @ q_low[h, j].double()) * scale  # (n_tokens,)
            total = torch.logsumexp(s, 0)
            for ci in range(c):
                part = s[ci * chunk:(ci + 1) * chunk]
                if part.numel():
                    out[h, j, ci] = part.max() if reduce == "max" else torch.logsumexp(part, 0) - total
    return torch.logsumexp(out, dim=1) if reduce == "group-mass" else out.amax(dim=1)


def check_topk(name, ids, scores, naive, first, end, k):
    masked = naive.clone()
    masked[:, :first] = float("-inf")
    masked[:, end:] = float("-inf")
    want_scores = masked.sort(dim=-1, descending=True).values[:, :k]
    assert ids.shape == scores.shape == (naive.shape[0], k) and ids.dtype == torch.int64
    assert max_diff(f"{name} top scores", scores, want_scores) < 1e-3
    picked = masked.gather(1, ids.cpu())  # the picks' own naive scores agree (robust to near-ties)
    assert max_diff(f"{name} picked", scores, picked) < 1e-3
    return masked


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("hkv,g", [(2, 4), (3, 3)])
def test_chunk_topk_matches_naive(gen, dtype, reduce, layout, hkv, g):
    r, chunk, s_cap, n_tokens = 6, 8, 8 * 13 + 3, 8 * 11 + 5  # odd chunk count, a partial last chunk
    q_low = randn(gen, hkv, g, r, dtype=dtype)
    coeffs = randn(gen, s_cap, r, dtype=dtype) if layout == "shared" else randn(gen, hkv, s_cap, r, dtype=dtype)
    scale = r**-0.5
    first, end, k = 1, 10, 4
    ids, scores = chunk_topk_torch(q_low, coeffs, n_tokens, end, k, chunk, scale, first, reduce)
    naive = naive_chunk_scores(q_low, coeffs, n_tokens, chunk, scale, reduce)
    check_topk(f"topk {layout} {reduce} {dtype}", ids, scores, naive, first, end, k)
    assert bool(((ids >= first) & (ids < end)).all())


def test_device_scalars_and_too_few_eligible(gen):
    q_low, coeffs = randn(gen, 2, 2, 4), randn(gen, 64, 4)
    a = chunk_topk_torch(q_low, coeffs, 40, 5, 3, 8, 0.5, first=1)
    b = chunk_topk_torch(q_low, coeffs, torch.tensor(40), torch.tensor(5), 3, 8, 0.5, first=1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ids, scores = chunk_topk_torch(q_low, coeffs, 40, 3, 4, 8, 0.5, first=1)  # only chunks 1, 2 eligible
    assert torch.isneginf(scores[:, 2:]).all() and torch.isfinite(scores[:, :2]).all()
    assert sorted(ids[0, :2].tolist()) == [1, 2]
    assert torch.equal(chunk_topk(q_low, coeffs, 40, 5, 3, 8, 0.5, 1, impl="torch")[0], a[0])
    with pytest.raises(ValueError):
        chunk_topk_torch(q_low, coeffs, 40, 5, 9, 8, 0.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
@pytest.mark.parametrize("hkv,g,r,chunk,s_cap", [(2, 4, 8, 16, 16 * 37), (3, 3, 32, 32, 32 * 29 + 7), (8, 4, 20, 8, 8 * 101)])
def test_chunk_topk_triton_matches_torch(gen, triton_device, dtype, reduce, layout, hkv, g, r, chunk, s_cap):
    from tierkv.kernels.chunk_topk_triton import chunk_scores_triton, chunk_topk_triton

    dev = triton_device
    q_low = randn(gen, hkv, g, r, device=dev)
    coeffs = randn(gen, s_cap, r, dtype=dtype, device=dev) if layout == "shared" else randn(gen, hkv, s_cap, r, dtype=dtype, device=dev)
    n_tokens = torch.tensor(s_cap - chunk - 3, device=dev)
    scale = r**-0.5
    red = chunk_scores_triton(q_low, coeffs, n_tokens, chunk, scale, reduce)
    assert max_diff(f"chunk scores triton {reduce} {dtype}", red, chunk_scores_torch(q_low, coeffs, n_tokens, chunk, scale, reduce)) < 1e-3
    n_chunks = red.shape[-1]
    ids, scores = chunk_topk_triton(q_low, coeffs, n_tokens, n_chunks - 2, 6, chunk, scale, 1, reduce)
    want_ids, want_scores = chunk_topk_torch(q_low, coeffs, n_tokens, n_chunks - 2, 6, chunk, scale, 1, reduce)
    assert max_diff(f"topk scores triton {reduce} {dtype}", scores, want_scores) < 1e-3
    assert (ids == want_ids).float().mean() > 0.9  # ids may swap only on near-ties


def int8_rows(gen, lead, s_cap, r, device="cpu"):
    """Random int8 rows (*lead, S, r) and fp32 row scales (*lead, S), dequantised values of order 1."""
    a = torch.randint(-127, 128, (*lead, s_cap, r), generator=gen, dtype=torch.int8)
    row_scale = torch.rand(*lead, s_cap, generator=gen) * 0.015 + 0.005
    return a.to(device), row_scale.to(device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("layout", ["shared", "per_head"])
def test_chunk_topk_int8_rows_match_naive(gen, dtype, reduce, layout):
    hkv, g, r, chunk, s_cap, n_tokens = 3, 2, 12, 8, 8 * 13 + 3, 8 * 11 + 5
    q_low = randn(gen, hkv, g, r, dtype=dtype)
    a, row_scale = int8_rows(gen, () if layout == "shared" else (hkv,), s_cap, r)
    deq = a.double() * row_scale.double().unsqueeze(-1)  # the rows the int8 values stand for, in fp64
    scale, first, end, k = r**-0.5, 1, 10, 4
    ids, scores = chunk_topk_torch(q_low, a, n_tokens, end, k, chunk, scale, first, reduce, row_scale=row_scale)
    naive = naive_chunk_scores(q_low, deq, n_tokens, chunk, scale, reduce)
    check_topk(f"topk int8 {layout} {reduce} {dtype}", ids, scores, naive, first, end, k)
    red = chunk_scores_torch(q_low, a, n_tokens, chunk, scale, reduce, row_scale=row_scale)
    want = chunk_scores_torch(q_low.double(), deq, n_tokens, chunk, scale, reduce)
    assert max_diff(f"chunk scores int8 {layout} {reduce} {dtype}", red, want) < 1e-4
    assert torch.equal(chunk_topk(q_low, a, n_tokens, end, k, chunk, scale, first, reduce, row_scale=row_scale,
                                  impl="torch")[0], ids)


def test_int8_coeffs_need_a_matching_row_scale(gen):
    q_low = randn(gen, 2, 2, 4)
    a, row_scale = int8_rows(gen, (2,), 64, 4)
    with pytest.raises(ValueError, match="row_scale"):
        chunk_topk_torch(q_low, a, 40, 5, 3, 8, 0.5)
    with pytest.raises(ValueError, match="row_scale"):
        chunk_topk_torch(q_low, a, 40, 5, 3, 8, 0.5, row_scale=row_scale[:, :63])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("layout", ["shared", "per_head", "per_head_slice"])
@pytest.mark.parametrize("hkv,g,r,chunk,s_cap", [(2, 4, 48, 16, 16 * 37), (3, 3, 20, 32, 32 * 29 + 7)])
def test_chunk_topk_triton_int8_rows_match_torch(gen, triton_device, dtype, reduce, layout, hkv, g, r, chunk, s_cap):
    """int8 rows with fp32 row scales, as LowRankIndex stores them; per_head_slice: the first S rows of a larger
    buffer, as LowRankIndex.top_chunks passes them."""
    from tierkv.kernels.chunk_topk_triton import chunk_scores_triton, chunk_topk_triton

    dev = triton_device
    q_low = randn(gen, hkv, g, r, dtype=dtype, device=dev)
    if layout == "shared":
        a, row_scale = int8_rows(gen, (), s_cap, r, dev)
    else:
        extra = 40 if layout == "per_head_slice" else 0
        a, row_scale = int8_rows(gen, (hkv,), s_cap + extra, r, dev)
        a, row_scale = a[:, :s_cap], row_scale[:, :s_cap]
    n_tokens = torch.tensor(s_cap - chunk - 3, device=dev)
    scale = r**-0.5
    red = chunk_scores_triton(q_low, a, n_tokens, chunk, scale, reduce, row_scale=row_scale)
    want = chunk_scores_torch(q_low, a, n_tokens, chunk, scale, reduce, row_scale=row_scale)
    assert max_diff(f"chunk scores triton int8 {layout} {reduce} {dtype}", red, want) < 1e-3
    n_chunks = red.shape[-1]
    ids, scores = chunk_topk_triton(q_low, a, n_tokens, n_chunks - 2, 6, chunk, scale, 1, reduce, row_scale=row_scale)
    want_ids, want_scores = chunk_topk_torch(q_low, a, n_tokens, n_chunks - 2, 6, chunk, scale, 1, reduce,
                                             row_scale=row_scale)
    assert max_diff(f"topk scores triton int8 {reduce} {dtype}", scores, want_scores) < 1e-3
    assert (ids == want_ids).float().mean() > 0.9  # ids may swap only on near-ties


def test_select_top_chunks_ties_go_to_the_lower_id():
    from tierkv.kernels.chunk_topk import select_top_chunks

    red = torch.tensor([[[1.0, 3.0, 3.0, -0.0, 0.0, 5.0, 3.0, 0.0]]])  # (Hkv=1, G=1, C=8)
    ids, scores = select_top_chunks(red, 8, 5, 0, "max")
    assert ids.tolist() == [[5, 1, 2, 6, 0]] and scores.tolist() == [[5.0, 3.0, 3.0, 3.0, 1.0]]
    ids, scores = select_top_chunks(red, 7, 8, 1, "max")  # -0.0 ties with 0.0; then the ineligible 0 and 7
    assert ids.tolist() == [[5, 1, 2, 6, 3, 4, 0, 7]]
    assert not torch.signbit(scores[0, 4:6]).any() and torch.isneginf(scores[0, 6:]).all()


def select_inputs(gen, hkv, g, c, dev):
    """Random chunk scores (Hkv, G, C) with empty (-inf) chunks and exact ties (in the first half, chunk 2i+1
    repeats chunk 2i), and the scoring kernel's partial log-sum-exps over blocks of 8 chunks (Hkv, G, P)."""
    red = randn(gen, hkv, g, c, scale=3.0)
    red[:, :, torch.randperm(c, generator=gen)[:c // 6]] = float("-inf")
    m = c // 2
    red[:, :, 1:m:2] = red[:, :, 0:m - 1:2]
    padded = torch.nn.functional.pad(red, (0, -c % 8), value=float("-inf"))
    parts = torch.logsumexp(padded.view(hkv, g, -1, 8), dim=-1)
    return red.to(dev), parts.to(dev)


# (chunks, k, first, select_end, select_end as a device tensor, with the scoring kernel's partials)
SELECT_CASES = [
    (1, 1, 0, 1, False, False),  # one chunk, one program, no stage 2
    (37, 7, 2, 30, True, True),
    (37, 37, 0, 37, False, True),  # k == C, padded to 64 keys
    (100, 64, 5, 40, True, False),  # fewer than k eligible: -inf picks
    (1000, 64, 3, 990, True, True),  # 4 blocks
    (4099, 64, 2, 4090, True, True),  # 17 blocks, padded to 32 runs in stage 2
    (4099, 1, 0, 4099, False, False),
    (600, 256, 1, 599, False, True),  # the largest fused k
    (1000, 1000, 0, 1000, True, False),  # k > 256: reduce kernel + torch top-k
]


@pytest.mark.cuda
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("c,k,first,end,end_tensor,with_parts", SELECT_CASES)
def test_select_top_chunks_triton_matches_torch(gen, triton_device, reduce, c, k, first, end, end_tensor, with_parts):
    from tierkv.kernels.chunk_topk import select_top_chunks
    from tierkv.kernels.chunk_topk_triton import select_top_chunks_triton

    hkv, g = (2, 4) if c < 2000 else (1, 3)
    red, parts = select_inputs(gen, hkv, g, c, triton_device)
    end_arg = torch.tensor(end, device=triton_device) if end_tensor else end
    use_parts = parts if with_parts and reduce != "max" else None
    ids, scores = select_top_chunks_triton(red, end_arg, k, first, reduce, use_parts)
    want_ids, want_scores = select_top_chunks(red, end, k, first, reduce)
    assert ids.shape == scores.shape == (hkv, k) and ids.dtype == torch.int64 and scores.dtype == torch.float32
    name = f"select triton C={c} k={k} {reduce}"
    assert max_diff(name, scores, want_scores) <= (0.0 if reduce == "max" else 1e-5)  # mass: the totals' rounding
    assert torch.equal(ids.cpu(), want_ids.cpu())  # ties (and -inf picks) go to the lower id in both
    assert all(len(set(row)) == k for row in ids.tolist())
    finite = torch.isfinite(scores)
    assert bool(((ids >= first) & (ids < end))[finite].all()) and bool(((ids >= 0) & (ids < c)).all())


@pytest.mark.cuda
@pytest.mark.parametrize("reduce", ["mass", "max"])
@pytest.mark.parametrize("k", [7, 64])
def test_select_top_chunks_triton_all_ties(triton_device, reduce, k):
    from tierkv.kernels.chunk_topk_triton import select_top_chunks_triton

    red = torch.zeros(2, 3, 300, device=triton_device)  # every chunk ties
    ids, scores = select_top_chunks_triton(red, torch.tensor(250, device=triton_device), k, 3, reduce)
    assert ids.tolist() == [list(range(3, 3 + k))] * 2
    ids, scores = select_top_chunks_triton(red, 50, 64, 10, reduce)  # 40 eligible, then the lowest others
    assert ids.tolist() == [list(range(10, 50)) + list(range(10)) + list(range(50, 64))] * 2
    assert torch.isfinite(scores[:, :40]).all() and torch.isneginf(scores[:, 40:]).all()


@pytest.mark.cuda
@pytest.mark.parametrize("reduce", ["mass", "group-mass", "max"])
@pytest.mark.parametrize("c,k", [(8192 + 5, 64), (32768, 256)])
def test_select_top_chunks_triton_large(gen, triton_device, reduce, c, k):
    if triton_device != "cuda":
        pytest.skip("a Llama-3.1-8B decode shape: too slow for the interpreter")
    from tierkv.kernels.chunk_topk import select_top_chunks
    from tierkv.kernels.chunk_topk_triton import select_top_chunks_triton

    red, parts = select_inputs(gen, 8, 4, c, triton_device)
    ids, scores = select_top_chunks_triton(red, torch.tensor(c - 128, device="cuda"), k, 2, reduce,
                                           parts if reduce != "max" else None)
    want_ids, want_scores = select_top_chunks(red, c - 128, k, 2, reduce)
    tol = 0.0 if reduce == "max" else 1e-5
    assert max_diff(f"select triton large C={c} k={k} {reduce}", scores, want_scores) <= tol
    assert torch.equal(ids, want_ids)
