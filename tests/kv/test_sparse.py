"""SparseKVCache: exact when the budget covers the context, exact machinery at full rank, per-head picks,
tiers and prefetch stats under a small budget, RoPE derived from the (k, k_pre) pairs."""

import math

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.kernels.rope import rope_torch
from tierkv.kv.cache import DenseKVCache
from tierkv.kv.select import merge_picks
from tierkv.kv.sparse import SparseKVCache, SparseOptions
from tierkv.kv.tiered import TieredKVCache, TieredOptions

L, HQ, HKV, D, C = 2, 4, 2, 8, 4
CB = 2 * C * HKV * D * 4


class Rope:
    """Stand-in for tierkv.models.rope.Rope: cos/sin tables and ensure()."""

    def __init__(self, n: int = 1024) -> None:
        inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
        emb = torch.cat([torch.outer(torch.arange(n).float(), inv)] * 2, dim=-1)
        self.cos, self.sin = emb.cos(), emb.sin()

    def ensure(self, length: int) -> None:
        assert length <= self.cos.shape[0]


ROPE = Rope()


class AlwaysSparse(SparseKVCache):
    """Runs the sparse machinery even when the budget covers every chunk."""

    def _exact_step(self, plan) -> bool:
        return False


def feed(caches, steps, seed=0):
    """Append the same random pre-RoPE keys (RoPE'd), values and queries to every cache; yield outputs."""
    g = torch.Generator().manual_seed(seed)
    pos0 = 0
    for t in steps:
        pos = torch.arange(pos0, pos0 + t)
        for layer in range(L):
            k_pre = torch.randn(t, HKV, D, generator=g) * torch.linspace(2, 0.1, D)
            k = rope_torch(k_pre, ROPE.cos, ROPE.sin, pos)
            v, q = torch.randn(t, HKV, D, generator=g), torch.randn(t, HQ, D, generator=g)
            outs = []
            for c in caches:
                c.append(layer, k, v, k_pre)
                outs.append(c.attend(layer, q))
            yield t, layer, outs
        for c in caches:
            c.advance(t)
        pos0 += t


def config(**kw):
    base = dict(chunk_size=C, attention="sparse", rank=HKV * D, sink_tokens=4, window_tokens=8)
    return TierConfig(**{**base, **kw})


def test_budget_covering_the_context_equals_full_exactly():
    sparse = SparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config(token_budget=10**6, rank=2))
    tiered = TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config(token_budget=10**6))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32)
    for _, _, (a, b, c) in feed([sparse, tiered, dense], [37, 1, 1, 1, 5, 1, 1]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    assert sparse.stats()["sparse"]["dense_steps"] == 5


@pytest.mark.parametrize("rope", [ROPE, None])
def test_full_rank_sparse_machinery_over_every_chunk_equals_full(rope):
    sparse = AlwaysSparse(L, HKV, D, device="cpu", dtype=torch.float32, config=config(token_budget=10**6),
                          rope=rope, sparse=SparseOptions(fold_tokens=8))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32)
    worst = 0.0
    for t, _, (a, b) in feed([sparse, dense], [41] + [1] * 20):
        worst = max(worst, (a - b).abs().max().item())
        torch.testing.assert_close(a, b, atol=2e-5, rtol=0)
    s = sparse.stats()["sparse"]
    print(f"max diff {worst:.2e}, stats {s}")
    assert s["sparse_steps"] == 20 and s["rebuilt_tokens"] > 0 and s["rope"] == ("given" if rope else "derived")
    assert sparse.shadows[0].covered >= 56  # decode keys were folded (fold_tokens=8)


def test_derived_rope_matches_the_tables():
    cache = SparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config())
    for _ in feed([cache], [30, 1, 1]):
        pass
    torch.testing.assert_close(cache._cos[:32], ROPE.cos[:32], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache._sin[:32], ROPE.sin[:32], atol=1e-5, rtol=0)


def reference(cache: SparseKVCache, layer: int, q: torch.Tensor, keys, values) -> torch.Tensor:
    """Attention over the chunks the cache's own scorer picks per head, with exact keys (rebuild=False)."""
    total = keys.shape[0]
    plan = cache.plan(total)
    top = cache.scorers[layer].top_chunks(q[0], plan.sink_end, plan.window_start, min(plan.picks, plan.candidates))
    ids, keep = merge_picks(top, plan)
    mask = torch.ones(HKV, total, dtype=torch.bool)
    mask[:, : plan.sealed * C] = False
    for j, i in enumerate(ids.tolist()):
        mask[:, i * C:(i + 1) * C] = keep[:, j:j + 1]
    mask[:, -1] = True
    s = torch.einsum("hgd,thd->hgt", q[0].view(HKV, HQ // HKV, D), keys) / math.sqrt(D)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    return torch.einsum("hgt,thd->hgd", s.softmax(-1), values).reshape(1, HQ, D)


def test_per_head_picks_on_tiers_with_prefetch_stats(tmp_path):
    cfg = config(token_budget=24, kv_gpu_budget=30 * CB, cpu_budget=8 * CB, disk_dir=str(tmp_path))
    cache = SparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=cfg,
                          options=TieredOptions(batch_tokens=8, io_threads=2), sparse=SparseOptions(rebuild=False))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32)
    steps = [120] + [1] * 30
    for t, layer, (out, _) in feed([cache, dense], steps, seed=3):
        if t == 1:
            end = cache.seq_len + 1
            want = reference(cache, layer, dense_q[layer], dense.k[layer, :end], dense.v[layer, :end])
            torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    s = cache.stats()
    sp = s["sparse"]
    print(sp, s["total"]["hit_rate"])
    assert sp["sparse_steps"] == 30 and sp["attended_tokens_per_layer_step"] <= 24
    assert 0 < sp["prefetch_recall"] <= 1 and s["chunks"]["disk"] > 0
    assert sum(s["total"]["hits"].values()) >= sp["chunks_needed"]  # prefill reads count too
    cache.close()


dense_q: dict[int, torch.Tensor] = {}


@pytest.fixture(autouse=True)
def _capture_queries(monkeypatch):
    """Record each layer's last query as the caches see it (for the reference above)."""
    orig = DenseKVCache.attend

    def attend(self, layer, q):
        dense_q[layer] = q
        return orig(self, layer, q)

    monkeypatch.setattr(DenseKVCache, "attend", attend)


def test_append_needs_pre_rope_keys():
    cache = SparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config())
    with pytest.raises(ValueError, match="k_pre"):
        cache.append(0, torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))
