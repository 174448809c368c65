"""Budget planning, per-head pick merging, and scorers: full-rank low-rank scores pick what true attention would."""

import math

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.kv.sparse.select import class_sizes, merge_picks, plan_on_device, plan_selection, plan_step
from tierkv.kv.sparse.index import ChunkLandmarks, LowRankIndex, make_index

HKV, G, D, C = 2, 3, 8, 4


def test_plan_counts_sinks_window_and_open_chunk_in_the_budget():
    p = plan_selection(total=101, chunk_size=4, sink_tokens=8, window_tokens=8, budget_tokens=40)
    assert (p.sealed, p.sink_end, p.window_start, p.open_tokens) == (25, 2, 23, 1)
    assert p.picks == (40 - 4 * 4 - 1) // 4 == 5 and p.attended_tokens == 37 <= 40 and not p.dense
    assert plan_selection(101, 4, 8, 8, budget_tokens=101).dense  # budget >= context: every chunk
    assert plan_selection(101, 4, 8, 8, budget_tokens=10).picks == 0  # sinks and window only
    short = plan_selection(10, 4, 8, 8, budget_tokens=4)
    assert (short.sink_end, short.window_start, short.candidates) == (2, 2, 0) and short.dense


@pytest.mark.parametrize("budget,floor", [(40, 0), (10, 0), (40, 2048), (0.25, 0), (0.25, 24), (0.125, 2048)])
def test_device_plan_equals_the_host_plan(budget, floor):
    """The captured step's plan (tensors) does plan_step's arithmetic (TierConfig.budget_tokens, floor included):
    same sealed, window, picks (capped at the candidates) and fixed entries sinks | window | open chunk with their
    valid tokens."""
    tier = TierConfig(chunk_size=4, sink_tokens=8, window_tokens=8, token_budget=budget, budget_floor_tokens=floor)
    for total in (1, 3, 4, 9, 33, 101, 400, 2047, 2048, 2049, 8191, 16383, 16384, 16385, 16400, 40000):
        want = plan_step(total, tier)
        assert want == plan_selection(total, 4, 8, 8, tier.budget_tokens(total))
        got = plan_on_device(torch.tensor([total]), 4, sink_chunks=2, window_chunks=2, token_budget=budget,
                             floor_tokens=floor)
        assert (got.total.item(), got.sealed.item(), got.window_start.item()) == (total, want.sealed, want.window_start)
        assert got.picks.item() == min(want.picks, want.candidates)
        sinks, window = range(2), range(want.window_start, want.window_start + 2)
        assert got.fixed_ids.tolist() == [*sinks, *window, want.sealed]
        assert got.fixed_len.tolist() == [4 if i < want.sink_end else 0 for i in sinks] + \
            [4 if i < want.sealed else 0 for i in window] + [want.open_tokens]


def test_the_floor_sets_the_picks_below_8x_the_floor():
    """Default budget (1/8, at least 2,048 tokens) with 32-token chunks, 64 sink and 128 window tokens: below 16K
    the step picks (2048 - fixed) // 32 chunks; from 16K on, an eighth of the context."""
    tier = TierConfig()
    fixed = 2 * 32 + 4 * 32 + 1  # sinks, window, the open chunk's one token
    for total, budget in ((4097, 2048), (16385, 2048), (32769, 4096), (131073, 16384)):
        assert plan_step(total, tier).picks == (budget - fixed) // 32
        got = plan_on_device(torch.tensor([total]), 32, 2, 4, tier.token_budget, tier.budget_floor_tokens)
        assert got.picks.item() == (budget - fixed) // 32
    eighth = TierConfig(budget_floor_tokens=0)
    assert plan_step(4097, eighth).picks == (512 - fixed) // 32 == 9


@pytest.mark.parametrize("capacity,max_picks,no_floor", [(4096, 64, 16), (16384, 64, 64), (32768, 128, 128),
                                                         (131072, 512, 512), (1000, 32, 4)])
def test_class_sizes_reserve_picks_for_the_floor(capacity, max_picks, no_floor):
    """max_picks, the picks a cache of this capacity is built for, is the budget at full capacity in chunks (at most
    every chunk): the floor raises it at short capacities."""
    assert class_sizes(TierConfig(), capacity).max_picks == max_picks
    assert class_sizes(TierConfig(budget_floor_tokens=0), capacity).max_picks == no_floor


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
    idx = make_index("lowrank", HKV, D, 4, C, device=torch.device("cpu"), dtype=torch.float32)
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


def exact_coeffs(idx: LowRankIndex, keys: torch.Tensor) -> torch.Tensor:
    """The unquantised projections of keys (S, Hkv, D): (Hkv, S, r), or (S, r) when shared, in fp64."""
    if idx.shared:
        return keys.reshape(keys.shape[0], -1).double() @ idx.basis.double().T
    return torch.einsum("thd,hrd->htr", keys.double(), idx.basis.double())


@pytest.mark.parametrize("shared", [False, True])
def test_low_rank_index_stores_int8_rows_within_half_a_step(shared):
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(50, HKV, D, generator=g) * torch.linspace(0.2, 30, D)  # (S, Hkv, D)
    keys[7] = 0  # a zero row: scale 1, no NaN
    idx = LowRankIndex(HKV, D, 6, C, shared=shared, reduce="mass", device=torch.device("cpu"), dtype=torch.float32)
    idx.fit(keys[:20])
    idx.extend(keys[20:])
    lead = () if shared else (HKV,)
    n = idx.count
    assert n == 50 and idx.coeffs.dtype == torch.int8 and idx.row_scale.dtype == torch.float32
    assert idx.coeffs.shape[:-2] == idx.row_scale.shape[:-1] == lead and idx.coeffs.shape[-1] == 6
    q8, rs = idx.coeffs[..., :n, :], idx.row_scale[..., :n]
    exact = exact_coeffs(idx, keys)
    err = (q8.double() * rs.double().unsqueeze(-1) - exact).abs()
    assert bool((err <= rs.double().unsqueeze(-1) * (0.5 + 1e-4)).all()), float((err / rs.unsqueeze(-1)).max())
    zero = q8[7] if shared else q8[:, 7]
    assert not zero.any() and bool((rs[..., 7] == 1).all())
    nonzero = torch.ones(50, dtype=torch.bool)
    nonzero[7] = False
    assert bool((q8.abs().amax(-1)[..., nonzero] == 127).all())  # each row uses the full int8 range
    assert idx.nbytes == idx.basis.numel() * 4 + idx.coeffs.numel() + idx.row_scale.numel() * 4


def test_write_at_equals_extend_and_reserve_and_growth_keep_rows():
    g = torch.Generator().manual_seed(4)
    keys = torch.randn(40, HKV, D, generator=g) * torch.linspace(0.5, 8, D)
    a = LowRankIndex(HKV, D, 5, C, shared=False, reduce="mass", device=torch.device("cpu"), dtype=torch.float32)
    a.fit(keys[:24])
    kept = a.coeffs[:, :24].clone(), a.row_scale[:, :24].clone()
    a.reserve(300)  # room for later in-place writes; what is indexed stays
    assert a.coeffs.shape[1] == a.row_scale.shape[1] == 300
    assert torch.equal(a.coeffs[:, :24], kept[0]) and torch.equal(a.row_scale[:, :24], kept[1])
    b = LowRankIndex(HKV, D, 5, C, shared=False, reduce="mass", device=torch.device("cpu"), dtype=torch.float32)
    b.basis = a.basis
    b.reserve(300)
    b.coeffs[:, :24], b.row_scale[:, :24] = kept
    b.count = 24
    coeffs, row_scale = b.coeffs, b.row_scale
    for t in range(24, 40):  # the graph-safe decode write, one token at a device position
        b.write_at(torch.tensor([t]), keys[t:t + 1])
        b.count = t + 1
    assert b.coeffs is coeffs and b.row_scale is row_scale  # in place: no reallocation
    a.extend(keys[24:])
    same_rows(b, a, range(40))  # the batched and the one-token projections round alike but for the last bits
    before = a.coeffs[:, :40].clone(), a.row_scale[:, :40].clone()
    a.extend(keys.repeat(8, 1, 1))  # past the reserved room: grows, keeping every row
    assert a.count == 360 and a.coeffs.shape[1] == a.row_scale.shape[1] >= 360
    assert torch.equal(a.coeffs[:, :40], before[0]) and torch.equal(a.row_scale[:, :40], before[1])
    same_rows(a, b, range(40), at=80)


def same_rows(x: LowRankIndex, y: LowRankIndex, rows, at: int = 0) -> None:
    """x's indexed rows at+rows equal y's rows up to one int8 step (a projection rounded otherwise by an ulp)."""
    rows = torch.tensor(list(rows))
    sx, sy = x.row_scale[:, rows + at], y.row_scale[:, rows]  # (Hkv, n)
    torch.testing.assert_close(sx, sy, rtol=1e-5, atol=0)
    assert int((x.coeffs[:, rows + at].int() - y.coeffs[:, rows].int()).abs().max()) <= 1


def test_low_rank_index_state_round_trips_and_checks_int8():
    from tierkv.errors import ConfigError
    from tierkv.kv.sparse.state import check_meta, meta, pack_index, unpack_index

    g = torch.Generator().manual_seed(5)
    keys = torch.randn(30, HKV, D, generator=g)
    q = torch.randn(HKV * G, D, generator=g)

    def fresh():
        return LowRankIndex(HKV, D, 4, C, shared=False, reduce="mass", device=torch.device("cpu"), dtype=torch.float32)
    src = fresh()
    src.fit(keys)
    state = pack_index(src, "x.")
    assert state["x.coeffs"].dtype == torch.int8 and state["x.row_scale"].shape == (HKV, 30)
    dst = fresh()
    unpack_index(dst, state, "x.")
    assert dst.count == 30 and torch.equal(dst.coeffs, src.coeffs[:, :30]) and torch.equal(dst.row_scale, src.row_scale[:, :30])
    assert torch.equal(dst.top_chunks(q, 1, 6, 2), src.top_chunks(q, 1, 6, 2))
    for name, bad in [("coeffs", state["x.coeffs"].float()), ("row_scale", state["x.row_scale"][:, :29])]:
        with pytest.raises(ConfigError, match=name):
            unpack_index(fresh(), state | {f"x.{name}": bad}, "x.")
    mine = meta(C, 8, 4, "lowrank", 30)
    older = mine.clone()
    older[0] = 1  # saved before the index was int8: refused with a message that names the format
    with pytest.raises(ConfigError, match="format 1 but this tierkv reads format 2"):
        check_meta(older, mine)
