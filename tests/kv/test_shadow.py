"""Key shadows: the truncated SVD's predicted error, rebuilt keys within it, exact outlier chunks, folding."""

import torch

from tierkv.kernels.rope import rope_torch
from tierkv.kv.sparse.shadow import KeyShadow, fit_basis

HKV, D, C = 2, 8, 4


def tables(n: int, d: int = D) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([torch.outer(torch.arange(n).float(), inv)] * 2, dim=-1)  # (n, D)
    return emb.cos(), emb.sin()


def low_rank_keys(s: int, rank: int, noise: float, seed: int = 0) -> torch.Tensor:
    basis = torch.randn(rank, HKV * D, generator=torch.Generator().manual_seed(0))  # same subspace every call
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(s, rank, generator=g) @ basis
    return (x + noise * torch.randn(s, HKV * D, generator=g)).view(s, HKV, D)


def test_fit_basis_predicts_the_svd_error():
    x = low_rank_keys(64, 5, 0.1).reshape(64, -1)
    for r in (1, 4, 8, 16):
        basis, dropped = fit_basis(x, r)
        torch.testing.assert_close(basis @ basis.T, torch.eye(r), atol=1e-5, rtol=0)  # orthonormal rows
        actual = (x - x @ basis.T @ basis).pow(2).sum()
        svals = torch.linalg.svdvals(x.double())
        print(f"rank {r}: predicted {dropped.item():.4f} actual {actual.item():.4f}")
        torch.testing.assert_close(actual, dropped, rtol=2e-3, atol=1e-3)
        torch.testing.assert_close(dropped.double(), svals[r:].pow(2).sum(), rtol=2e-3, atol=1e-3)


def test_rebuilt_keys_match_exact_within_the_predicted_error():
    s, r = 64, 4
    pre = low_rank_keys(s, 3, 0.05)
    cos, sin = tables(s)
    post = rope_torch(pre, cos, sin, torch.arange(s))
    sh = KeyShadow(HKV, D, r, C, outlier_threshold=float("inf"), device=torch.device("cpu"), dtype=torch.float32)
    sh.fit(pre, post)
    rebuilt = sh.keys(torch.arange(s // C), cos, sin)  # (S, Hkv, D)
    err = (rebuilt - post).pow(2).sum()  # RoPE is a rotation: post-RoPE error equals the pre-RoPE one
    print(f"squared error {err.item():.5f}, predicted {sh.predicted_sq_err.item():.5f}")
    torch.testing.assert_close(err, sh.predicted_sq_err, rtol=2e-3, atol=1e-4)
    assert sh.num_outliers == 0
    full = KeyShadow(HKV, D, HKV * D, C, outlier_threshold=0.5, device=torch.device("cpu"), dtype=torch.float32)
    full.fit(pre, post)  # full rank: exact
    torch.testing.assert_close(full.keys(torch.arange(s // C), cos, sin), post, atol=1e-4, rtol=1e-4)


def test_outlier_chunks_keep_exact_keys_and_folded_chunks_are_judged():
    s = 64
    pre = low_rank_keys(s, 2, 0.01)
    pre[20:24] = torch.randn(4, HKV, D, generator=torch.Generator().manual_seed(5))  # chunk 5: off-subspace
    cos, sin = tables(2 * s)
    post = rope_torch(pre, cos, sin, torch.arange(s))
    sh = KeyShadow(HKV, D, 2, C, outlier_threshold=0.3, device=torch.device("cpu"), dtype=torch.float32)
    sh.fit(pre[:40], post[:40])
    assert sh.outlier_slot[:10].tolist() == [-1] * 5 + [0] + [-1] * 4
    assert sh.chunk_err[5] > 0.3 > sh.chunk_err[:5].max()
    got = sh.keys(torch.tensor([5, 2]), cos, sin).view(2, C, HKV, D)
    assert torch.equal(got[0], post[20:24])  # the outlier chunk: exact
    assert not torch.equal(got[1], post[8:12])  # a normal chunk: rebuilt
    # decode-era keys: folded later onto the same basis; an off-subspace chunk among them becomes an outlier
    extra = low_rank_keys(24, 2, 0.01, seed=1)
    extra[8:12] = torch.randn(4, HKV, D, generator=torch.Generator().manual_seed(9))
    sh.fold(pre[40:], post[40:])
    extra_post = rope_torch(extra, cos, sin, torch.arange(s, s + 24))
    sh.fold(extra, extra_post)
    assert sh.covered == s + 24 and sh.num_outliers == 2
    assert torch.equal(sh.keys(torch.tensor([(s + 8) // C]), cos, sin), extra_post[8:12])


def test_folds_grow_the_coefficients_by_an_eighth_not_double():
    """Decode folds append a few tokens at a time: the buffer stays within an eighth (+256 rows) of what is
    covered, where doubling would leave up to half of it (GiBs at long context) unused."""
    sh = KeyShadow(HKV, D, 4, C, outlier_threshold=1.0, device=torch.device("cpu"), dtype=torch.float32)
    cos, sin = tables(4096)
    k_pre = low_rank_keys(4096, 4, 0.0)
    k = rope_torch(k_pre, cos, sin, torch.arange(4096))
    sh.fit(k_pre[:2048], k[:2048])
    assert sh.coeffs.shape[0] == 2048
    for lo in range(2048, 4096, 32):
        sh.fold(k_pre[lo:lo + 32], k[lo:lo + 32])
        assert sh.covered <= sh.coeffs.shape[0] <= sh.covered + sh.covered // 8 + 256 + 32
    rebuilt = sh.keys(torch.arange(1024), cos, sin)
    torch.testing.assert_close(rebuilt, k, atol=1e-4, rtol=1e-4)
