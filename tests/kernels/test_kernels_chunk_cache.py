"""GPU chunk cache: slot assignment against its invariants; fill + attention through the cache equals attention
without it, while hits really come from the cache (their host copies are poisoned) and misses are filled."""

import pytest
import torch

from tests.kernels.kutil import TOL, make_case, max_diff
from tierkv.kernels.chunk_cache import chunk_cache_assign_torch, chunk_cache_fill_torch
from tierkv.kernels.shadow_attention import shadow_paged_attention_torch


def assign_case(gen, hkv=4, k=9, s=9, n=40):
    top = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(hkv)])
    pick_len = torch.full((hkv, k), 16)
    pick_len[:, -2:] = 0  # ranks past this step's pick count
    pick_cids = torch.where(torch.rand(hkv, k, generator=gen) < 0.3, -1, top)  # some picks with exact keys
    rows = []
    for h in range(hkv):  # distinct chunks per head (as the cache keeps them): two picks already cached (hits)
        others = [c for c in torch.randperm(n, generator=gen).tolist() if c not in top[h, :2].tolist()]
        rows.append(torch.tensor(top[h, :2].tolist() + others[: s - 2])[torch.randperm(s, generator=gen)])
    cached = torch.stack(rows)
    cached[1, 3] = -1  # an empty slot
    cached[1] = torch.where(torch.isin(cached[1], top[1, :2]) | (cached[1] == -1), cached[1], -1)  # head 1: mostly empty
    return top, pick_len, pick_cids, cached


def check_assign(top, pick_len, before, after, csrc):
    for h in range(top.shape[0]):
        held = {int(c): sl for sl, c in enumerate(before[h].tolist()) if c >= 0}
        picked_now = {int(c) for c, n in zip(top[h].tolist(), pick_len[h].tolist()) if n > 0}
        free = [sl for sl, c in enumerate(before[h].tolist()) if c not in picked_now]
        taken = []
        for j, c in enumerate(top[h].tolist()):
            v = int(csrc[h, j])
            if pick_len[h, j] == 0:
                assert v == -1
            elif c in held:
                assert v == held[c], "a cached pick must be served from its slot"
            else:
                assert v <= -2, "an uncached pick must be a miss with a slot"
                taken.append(-v - 2)
        assert taken == free[:len(taken)], "misses take free slots in slot order"
        for sl in range(before.shape[1]):
            want = top[h, [j for j in range(top.shape[1]) if int(csrc[h, j]) == -sl - 2]]
            assert int(after[h, sl]) == (int(want[0]) if len(want) else int(before[h, sl]))


def test_assign_keeps_hits_and_gives_misses_free_slots(gen):
    top, pick_len, pick_cids, cached = assign_case(gen)
    before, counts = cached.clone(), torch.zeros(3, dtype=torch.long)
    csrc = chunk_cache_assign_torch(top, pick_len, pick_cids, cached, counts)
    check_assign(top, pick_len, before, cached, csrc)
    hits, exact_misses = int((csrc >= 0).sum()), int(((csrc <= -2) & (pick_cids < 0)).sum())
    assert hits >= 4 and exact_misses > 0
    assert counts.tolist() == [exact_misses, hits, int((pick_len > 0).sum())]


@pytest.mark.cuda
def test_assign_triton_matches_torch(gen, triton_device):
    from tierkv.kernels.chunk_cache_triton import chunk_cache_assign_triton

    top, pick_len, pick_cids, cached = assign_case(gen, hkv=8, k=13, s=13)
    want_cached, want_counts = cached.clone(), torch.zeros(3, dtype=torch.long)
    want = chunk_cache_assign_torch(top, pick_len, pick_cids, want_cached, want_counts)
    got_cached, got_counts = cached.to(triton_device), torch.zeros(3, dtype=torch.long, device=triton_device)
    got = chunk_cache_assign_triton(top.to(triton_device), pick_len.to(triton_device), pick_cids.to(triton_device),
                                    got_cached, got_counts)
    assert torch.equal(got.cpu(), want) and torch.equal(got_cached.cpu(), want_cached)
    assert torch.equal(got_counts.cpu(), want_counts)


FIXED = 2


def attention_case(gen, dtype, device, hq=8, hkv=2, d=32, r=6, chunk=8, m=9):
    q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, cids = make_case(
        gen, hq, hkv, d, r, chunk, m, "per_head", dtype, device)
    lengths[:, FIXED:] = chunk
    lengths[0, -1] = 0  # a rank past the pick count
    cids[:, :FIXED] = -1
    return (q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, cids), m - FIXED


def run_steps(gen, dtype, device, attend, assign, fill):
    """Three steps over the same pools: all misses, all hits (host copies of picks poisoned), half new picks."""
    args, k = attention_case(gen, dtype, device)
    q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, cids = args
    hkv, chunk, d = slots.shape[0], k_pool.shape[1], k_pool.shape[-1]
    k_cache = torch.zeros((k + 1, chunk, hkv, d), dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    cached = torch.full((hkv, k), -1, dtype=torch.long, device=device)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    clean_k, clean_v = k_pool.clone(), v_pool.clone()
    outs = []
    for step in range(3):
        if step == 2:  # half the picks change to chunks not cached; restore the host copies
            k_pool.copy_(clean_k)
            v_pool.copy_(clean_v)
            used = set(slots.flatten().tolist())
            spare = [c for c in range(k_pool.shape[0]) if c not in used]
            slots[:, FIXED::2] = torch.tensor(spare[: hkv * len(range(FIXED, slots.shape[1], 2))],
                                              device=device).view(hkv, -1)
            cids[:, FIXED::2] = -1  # new picks with exact keys: their keys go to the cache too
        top, pick_cids = slots[:, FIXED:], cids[:, FIXED:]
        csrc = assign(top, lengths[:, FIXED:], pick_cids, cached, counts)
        fill(top, pick_cids, csrc, k_pool, v_pool, k_cache, v_cache)
        want = shadow_paged_attention_torch(q, coeffs, basis, cos, sin, clean_k, clean_v, slots, lengths, cids)
        got = attend(q, coeffs, basis, cos, sin, k_pool, v_pool, slots, lengths, cids, cache=(k_cache, v_cache, csrc))
        outs.append((got, want, csrc, counts.clone()))
        if step == 0:  # poison the host copies of every picked chunk: step 1 must read them from the cache
            for h in range(hkv):
                for e in range(FIXED, slots.shape[1]):
                    if lengths[h, e] > 0:
                        k_pool[int(slots[h, e]), :, h] = float("nan")
                        v_pool[int(slots[h, e]), :, h] = float("nan")
    for h in range(hkv):  # every held slot holds its chunk's true keys and values
        for sl, c in enumerate(cached[h].tolist()):
            if c >= 0:
                assert torch.equal(v_cache[sl, :, h], clean_v[c, :, h])
                if any(int(cids[h, e]) < 0 and int(slots[h, e]) == c for e in range(FIXED, slots.shape[1])):
                    assert torch.equal(k_cache[sl, :, h], clean_k[c, :, h])
    return outs, lengths, cids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_through_the_cache_equals_without_it(gen, dtype):
    outs, lengths, cids = run_steps(gen, dtype, "cpu", shadow_paged_attention_torch, chunk_cache_assign_torch,
                                    chunk_cache_fill_torch)
    picks = int((lengths[:, FIXED:] > 0).sum())
    for step, (got, want, csrc, counts) in enumerate(outs):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), f"step {step}"
    assert outs[0][3][1:].tolist() == [0, picks]  # all misses
    assert outs[1][3][1:].tolist() == [picks, 2 * picks]  # all hits
    assert 0 < outs[2][3][1] - outs[1][3][1] < picks
    assert outs[2][3][0] > outs[1][3][0]  # step 2's new picks have exact keys


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_through_the_cache_triton(gen, triton_device, dtype):
    from tierkv.kernels.chunk_cache_triton import chunk_cache_assign_triton, chunk_cache_fill_triton
    from tierkv.kernels.shadow_attention_triton import shadow_paged_attention_triton

    outs, _, _ = run_steps(gen, dtype, triton_device, shadow_paged_attention_triton, chunk_cache_assign_triton,
                           chunk_cache_fill_triton)
    ref, _, _ = run_steps(torch.Generator().manual_seed(1234), dtype, triton_device, shadow_paged_attention_torch,
                          chunk_cache_assign_torch, chunk_cache_fill_torch)
    for step, ((got, want, _, counts), (_, _, _, ref_counts)) in enumerate(zip(outs, ref)):
        assert max_diff(f"cached attention step {step} {dtype}", got[0], want[0]) < TOL[dtype]
        assert torch.equal(counts.cpu(), ref_counts.cpu())
