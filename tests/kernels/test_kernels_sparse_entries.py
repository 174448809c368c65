"""sparse_entries: the torch reference against a per-entry loop on the CPU, and the Triton twin against it."""

import pytest
import torch

from tierkv.kernels.sparse_entries import sparse_entries_torch

CHUNK = 32


def case(gen, hkv=8, k=13, n=200):
    top = torch.randint(0, n, (hkv, k), generator=gen)
    score = torch.randn(hkv, k, generator=gen)
    score[0, min(3, k - 1)] = float("-inf")  # an ineligible pick
    picks, covered = torch.tensor([9]), torch.tensor([150])
    outlier = torch.rand(n, generator=gen) < 0.2
    fixed_ids = torch.tensor([0, 1, 50, 51, 52, 53, n])  # the open chunk may sit one past the pool
    fixed_len = torch.tensor([CHUNK, CHUNK, CHUNK, CHUNK, 0, 0, 5])
    return top, score, picks, covered, outlier, fixed_ids, fixed_len


def test_sparse_entries_torch_matches_a_loop(gen):
    top, score, picks, covered, outlier, fixed_ids, fixed_len = case(gen)
    counts = torch.zeros(6, dtype=torch.long)
    resident = (30, 90)  # chunks [30, 90) have their values on the GPU
    slots, lengths, cids = sparse_entries_torch(top, score, picks, covered, outlier, fixed_ids, fixed_len, CHUNK, 200,
                                                counts, resident)
    f = fixed_ids.shape[0]
    n_picked, n_exact, res_picks, res_fixed, res_exact = 0, 0, 0, 0, 0
    for h in range(top.shape[0]):
        for e in range(f):
            assert (slots[h, e], lengths[h, e], cids[h, e]) == (min(int(fixed_ids[e]), 199), int(fixed_len[e]), -1)
            res_fixed += int(fixed_len[e]) if resident[0] <= int(fixed_ids[e]) < resident[1] else 0
        for j in range(top.shape[1]):
            c = int(top[h, j])
            picked = j < 9 and score[h, j] > float("-inf")
            rebuilt = picked and c < 150 and not bool(outlier[c])
            assert (slots[h, f + j], lengths[h, f + j], cids[h, f + j]) == (c, CHUNK if picked else 0, c if rebuilt else -1)
            n_picked, n_exact = n_picked + picked, n_exact + (picked and not rebuilt)
            res_picks += picked and resident[0] <= c < resident[1]
            res_exact += picked and not rebuilt and resident[0] <= c < resident[1]
    assert counts.tolist() == [int(fixed_len.sum()) * top.shape[0], n_picked, n_exact, res_picks, res_fixed, res_exact]
    assert n_exact > 0 and 0 < res_picks < n_picked and 0 < res_fixed < counts[0] and 0 < res_exact < n_exact


@pytest.mark.cuda
@pytest.mark.parametrize("k", [1, 13, 64])
def test_sparse_entries_triton_matches_torch(gen, triton_device, k):
    from tierkv.kernels.sparse_entries_triton import sparse_entries_triton

    args = [t.to(triton_device) for t in case(gen, k=k)]
    want_counts, got_counts = (torch.zeros(6, dtype=torch.long, device=triton_device) for _ in range(2))
    want = sparse_entries_torch(*args, CHUNK, 200, want_counts, (30, 90))
    got = sparse_entries_triton(*args, CHUNK, 200, got_counts, (30, 90))
    for g, w in zip(got, want):
        assert torch.equal(g.cpu(), w.cpu())
    assert torch.equal(got_counts.cpu(), want_counts.cpu())
    assert torch.equal(sparse_entries_triton(*args, CHUNK, 200)[2].cpu(), want[2].cpu())  # counting is optional
