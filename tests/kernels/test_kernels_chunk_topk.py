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
