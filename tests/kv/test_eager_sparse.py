"""EagerSparseKVCache: exact when the budget covers the context, exact machinery at full rank, per-head picks,
tiers and prefetch stats under a small budget, RoPE derived from the (k, k_pre) pairs."""

import math

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.kernels.rope import rope_torch
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.sparse.select import merge_picks
from tierkv.kv.caches.eager_sparse import EagerSparseKVCache
from tierkv.kv.sparse.options import SparseOptions
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions

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


class AlwaysSparse(EagerSparseKVCache):
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
    sparse = EagerSparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config(token_budget=10**6, rank=2))
    tiered = TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config(token_budget=10**6))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32)
    for _, _, (a, b, c) in feed([sparse, tiered, dense], [37, 1, 1, 1, 5, 1, 1]):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)
    st = sparse.stats()["sparse"]
    assert st["dense_steps"] == 5 and (st["token_budget"], st["budget_floor_tokens"]) == (10**6, 2048)


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
    cache = EagerSparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config())
    for _ in feed([cache], [30, 1, 1]):
        pass
    torch.testing.assert_close(cache._cos[:32], ROPE.cos[:32], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache._sin[:32], ROPE.sin[:32], atol=1e-5, rtol=0)


def reference(cache: EagerSparseKVCache, layer: int, q: torch.Tensor, keys, values) -> torch.Tensor:
    """Attention over the chunks the cache's own scorer picks per head, with exact keys (rebuild=False)."""
    total = keys.shape[0]
    plan = cache.plan(total)
    top = cache.index[layer].top_chunks(q[0], plan.sink_end, plan.window_start, min(plan.picks, plan.candidates))
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
    cache = EagerSparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=cfg,
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
    cache = EagerSparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config())
    with pytest.raises(ValueError, match="k_pre"):
        cache.append(0, torch.zeros(1, HKV, D), torch.zeros(1, HKV, D))


# ---- session state: save/load, truncate -----------------------------------------------------------------
def small_budget(tmp_path=None, **kw):
    """Really sparse (24 of ~60-100 tokens per step); tiers on host and disk when tmp_path is given."""
    tiers = dict(kv_gpu_budget=30 * CB, cpu_budget=8 * CB, disk_dir=str(tmp_path)) if tmp_path else {}
    return config(token_budget=24, rank=6, **tiers, **kw)


def sparse_cache(rope, tmp_path=None, fold=8, cls=EagerSparseKVCache):
    return cls(L, HKV, D, device="cpu", dtype=torch.float32, config=small_budget(tmp_path), rope=rope,
               options=TieredOptions(batch_tokens=8, io_threads=1), sparse=SparseOptions(fold_tokens=fold))


class Tokens:
    """Fixed random keys, values and queries per position and layer, however they are grouped into forwards."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.k_pre = torch.randn(n, L, HKV, D, generator=g) * torch.linspace(2, 0.1, D)  # (N, L, Hkv, D)
        self.v, self.q = torch.randn(n, L, HKV, D, generator=g), torch.randn(n, L, HQ, D, generator=g)


TOKENS = Tokens(160, seed=5)


def outputs(cache, steps, data: Tokens = TOKENS) -> list[torch.Tensor]:
    """Run forwards of `steps` tokens each from cache.seq_len on; every layer's attention output."""
    outs = []
    for t in steps:
        p = torch.arange(cache.seq_len, cache.seq_len + t)
        for layer in range(L):
            k_pre = data.k_pre[p, layer]
            cache.append(layer, rope_torch(k_pre, ROPE.cos, ROPE.sin, p), data.v[p, layer], k_pre)
            outs.append(cache.attend(layer, data.q[p, layer]))
        cache.advance(t)
    return outs


def copy_via_session_format(src: EagerSparseKVCache, dst: EagerSparseKVCache) -> None:
    """What a session save + load does: K/V in blocks across layers, extra state through safetensors bytes."""
    from safetensors.torch import load, save

    n = src.seq_len
    dst.begin_import(n)
    for start in range(0, n, 16):
        for layer in range(L):
            dst.import_kv(layer, start, src.export_kv(layer, start, min(start + 16, n), device="cpu"))
    dst.finish_import(n)
    dst.load_extra_state(load(save({k: v.contiguous() for k, v in src.extra_state().items()})))


@pytest.mark.parametrize("rope,tiers", [(ROPE, False), (None, False), (ROPE, True)],
                         ids=["rope", "derived-rope", "rope-on-tiers"])
def test_saved_state_resumes_bitwise(rope, tiers, tmp_path):
    """Resumed from its saved state, a sparse cache gives the same outputs as the one that never stopped: bitwise
    when every chunk is on the device; on host and disk tiers exact steps may add batches in another tier order."""
    a = sparse_cache(rope, tmp_path / "a" if tiers else None)
    outputs(a, [57] + [1] * 12 + [5] + [1] * 8)  # fitted at step 58, decode keys folded (fold_tokens=8)
    assert all(a._fitted) and a.shadows[0].covered > 56 and a._buf[0] and a._last_picks[0]
    b = sparse_cache(rope, tmp_path / "b" if tiers else None)
    copy_via_session_format(a, b)
    sa, sb = a.extra_state(), b.extra_state()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    steps = [4] + [1] * 16
    for x, y in zip(outputs(a, steps), outputs(b, steps)):
        torch.testing.assert_close(x, y, atol=1e-6 if tiers else 0, rtol=0)
    s = b.stats()
    assert s["sparse"]["sparse_steps"] == 16 and (s["chunks"]["disk"] > 0) == tiers
    a.close(), b.close()


def test_unfitted_state_and_a_plain_kv_import_resume(tmp_path):
    a = sparse_cache(ROPE)
    outputs(a, [61])  # prefill only: every pre-RoPE key still buffered, nothing fitted
    b, c = sparse_cache(ROPE), sparse_cache(ROPE)
    copy_via_session_format(a, b)
    assert torch.equal(b._buf[0][0][0], a._buf[0][0][0]) and not any(b._fitted)
    n = a.seq_len  # c gets the K/V alone: it refits from the stored keys, un-rotated
    c.begin_import(n)
    for layer in range(L):
        c.import_kv(layer, 0, a.export_kv(layer, 0, n))
    c.finish_import(n)
    steps = [1] * 10
    oa, ob, oc = outputs(a, steps), outputs(b, steps), outputs(c, steps)
    assert all(torch.equal(x, y) for x, y in zip(oa, ob))
    for x, z in zip(oa, oc):
        torch.testing.assert_close(x, z, atol=1e-5, rtol=0)
    assert c.stats()["sparse"]["sparse_steps"] == 10


@pytest.mark.parametrize("cut,fold", [("prefix", 8), ("after-fit", 512), ("into-folded", 8), ("pending", 512)])
def test_truncate_then_continue_matches_a_cache_that_stopped_there(cut, fold):
    """a goes further, then is cut back to n. Its next outputs agree with b's, which never went further, up to
    the rounding of keys read back from the tiers and the order of prefetched batches. A cut into folded keys
    restarts the layer: b is then a cache that prefilled [0, n) at once."""
    a = sparse_cache(ROPE, fold=fold)
    outputs(a, [57] + [1] * 20)  # fitted at the first decode step (58 tokens)
    n = {"prefix": 57, "after-fit": 59, "into-folded": a.shadows[0].covered - 3, "pending": a.seq_len}[cut]
    if cut == "pending":  # a forward interrupted after layer 0's append, which extended its index
        a.append(0, *(torch.randn(9, HKV, D),) * 2, torch.randn(9, HKV, D))
    else:
        outputs(a, [1] * 4)
    fitted, covered = a._fitted[1], a.shadows[1].covered
    a.truncate(n)
    b = sparse_cache(ROPE, fold=fold)
    if cut == "into-folded":
        assert fitted and n < covered
        outputs(b, [n])
    else:
        outputs(b, [57] + [1] * (n - 57))
    for layer in range(L):
        assert (a._fitted[layer], a.shadows[layer].covered) == (b._fitted[layer], b.shadows[layer].covered)
        assert getattr(a.index[layer], "count", 0) == getattr(b.index[layer], "count", 0)
    assert a.seq_len == b.seq_len == n and a._fitted[0] == (cut in ("after-fit", "pending"))
    steps = [3] + [1] * 12
    for x, y in zip(outputs(a, steps), outputs(b, steps)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)
    assert a.stats()["sparse"]["sparse_steps"] >= 12 and all(a._fitted)


def test_outlier_chunks_use_the_keys_read_from_their_tier_and_keep_no_device_copy(tmp_path):
    """Every chunk an outlier (threshold 0): the same outputs as attending picked chunks with exact keys, while
    the shadows hold no exact keys on the device (they would sit outside the KV budget)."""
    opts = TieredOptions(batch_tokens=8, io_threads=1)
    make = lambda sp, d: EagerSparseKVCache(L, HKV, D, device="cpu", dtype=torch.float32,  # noqa: E731
                                            config=small_budget(d), rope=ROPE, options=opts, sparse=sp)
    outliers = make(SparseOptions(fold_tokens=8, outlier_threshold=0.0), tmp_path / "a")
    exact = make(SparseOptions(fold_tokens=8, rebuild=False), tmp_path / "b")
    steps = [40] + [1] * 30
    for got, want in zip(outputs(outliers, steps), outputs(exact, steps)):
        assert torch.equal(got, want)
    st = outliers.stats()["sparse"]
    assert st["outlier_chunks"] > 0 and st["sparse_steps"] > 0
    assert all(sh.exact.shape[0] == 0 for sh in outliers.shadows)
    assert outliers._n["rebuilt_tokens"] == 0  # every covered pick kept its tier keys
