"""Budget planning, per-head pick merging, and scorers: full-rank low-rank scores pick what true attention would."""

import math

import pytest
import torch

from tierkv.kv.select import merge_picks, plan_selection
from tierkv.kv.summary import ChunkLandmarks, LowRankIndex, make_scorer

HKV, G, D, C = 2, 3, 8, 4


def test_plan_counts_sinks_window_and_open_chunk_in_the_budget():
    p = plan_selection(total=101, chunk_size=4, sink_tokens=8, window_tokens=8, budget_tokens=40)
    assert (p.sealed, p.sink_end, p.window_start, p.open_tokens) == (25, 2, 23, 1)
    assert p.picks == (40 - 4 * 4 - 1) // 4 == 5 and p.attended_tokens == 37 <= 40 and not p.dense
    assert plan_selection(101, 4, 8, 8, budget_tokens=101).dense  # budget >= context: every chunk
    assert plan_selection(101, 4, 8, 8, budget_tokens=10).picks == 0  # sinks and window only
    short = plan_selection(10, 4, 8, 8, budget_tokens=4)
    assert (short.sink_end, short.window_start, short.candidates) == (2, 2, 0) and short.dense


def test_merge_picks_per_head():
    p = plan_selection(total=40, chunk_size=4, sink_tokens=4, window_tokens=4, budget_tokens=20)
    top = torch.tensor([[3, 5], [5, 7]])  # (Hkv, k)
    ids, keep = merge_picks(top, p)
    assert ids.tolist() == [0, 3, 5, 7, 9]
    assert keep.tolist() == [[True, True, True, False, True], [True, False, True, True, True]]


def oracle_top(q: torch.Tensor, keys: torch.Tensor, first: int, end: int, k: int) -> torch.Tensor:
    """Chunks with the largest true attention mass (max over the query group), per KV head."""
    s = torch.einsum("hgd,thd->hgt", q.view(HKV, G, D), keys) / math.sqrt(D)  # (Hkv, G, S)
    p = torch.softmax(s, -1).view(HKV, G, -1, C).sum(-1).amax(1)  # (Hkv, chunks)
    p[:, :first] = p[:, end:] = -1
    return p.topk(k, -1).indices.sort(-1).values


@pytest.mark.parametrize("shared", [False, True])
def test_full_rank_lowrank_scores_pick_the_oracle_chunks(shared):
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(60, HKV, D, generator=g) * torch.linspace(0.2, 3, D)  # (S, Hkv, D)
    q = torch.randn(HKV * G, D, generator=g) * 2
    idx = LowRankIndex(HKV, D, HKV * D if shared else D, C, shared=shared, reduce="mass",
                       device=torch.device("cpu"), dtype=torch.float32)
    idx.fit(keys[:40])
    idx.extend(keys[40:])  # later tokens are projected into the same (here complete) basis
    got = idx.top_chunks(q, 1, 13, 4).sort(-1).values
    assert torch.equal(got, oracle_top(q, keys, 1, 13, 4))


def test_low_rank_index_approximates_with_fewer_dims():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(64, HKV, D, generator=g) * torch.tensor([4, 3, 2, 1, .1, .1, .1, .1])
    q = torch.randn(HKV * G, D, generator=g)
    idx = make_scorer("lowrank", HKV, D, 4, C, device=torch.device("cpu"), dtype=torch.float32)
    idx.fit(keys)
    got = idx.top_chunks(q, 0, 16, 4).sort(-1).values
    want = oracle_top(q, keys, 0, 16, 4)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, want))
    assert overlap >= 6  # of 8


@pytest.mark.parametrize("kind", ["mean", "minmax"])
def test_landmarks(kind):
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(30, HKV, D, generator=g)
    lm = ChunkLandmarks(HKV, D, C, kind=kind, device=torch.device("cpu"))
    lm.fit(keys[:13])
    lm.extend(keys[13:])  # a partial chunk carries over
    assert lm.lo.shape == (HKV, 7, D)
    xc = keys[:28].view(7, C, HKV, D)
    torch.testing.assert_close(lm.lo, (xc.mean(1) if kind == "mean" else xc.amin(1)).permute(1, 0, 2))
    q = torch.randn(HKV * G, D, generator=g)
    qg = q.view(HKV, G, D)
    if kind == "mean":
        best = torch.einsum("hgd,hcd->hgc", qg, lm.lo).amax(1)
    else:
        best = torch.maximum(qg[:, :, None] * lm.lo[:, None], qg[:, :, None] * lm.hi[:, None]).sum(-1).amax(1)
    assert torch.equal(lm.top_chunks(q, 0, 7, 3), best.topk(3, -1).indices)
