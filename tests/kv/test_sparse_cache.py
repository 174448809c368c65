"""SparseKVCache: the graph-safe sparse cache gives EagerSparseKVCache's tokens (same plan, scorer, fold rule and
key rebuild) on the real model; on CUDA its captured step gives the same tokens as running it eagerly."""

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.engine import prefill
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.caches.eager_sparse import EagerSparseKVCache
from tierkv.kv.sparse.options import SparseOptions

from tests.kv.helpers import OPTS, TIER, new_sparse_cache, filled_decode, greedy, placed_cache, random_8b


def test_sparse_cache_gives_the_eager_oracle_tokens_on_smollm2(smol, text_ids):
    model, ids, n = smol.model, text_ids[:1500], 48
    c = model.cfg
    ref = EagerSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32, config=TIER,
                        rope=model.rope, sparse=OPTS)
    fast = new_sparse_cache(model, TIER, len(ids) + n + 1, chunk_cache=True)  # the cache path against the reference
    try:
        want = greedy(model, ref, ids, n)
        got = greedy(model, fast, ids, n)
        st = fast.stats()
        assert st["sparse_steps"] == n - 1 and st["folds"] >= 2  # every step sparse; folds happened mid-run
        assert ref.stats()["sparse"]["sparse_steps"] == n - 1
        assert got == want
    finally:
        ref.close()
        fast.close()


def test_sparse_cache_is_exact_while_the_budget_covers_the_context(smol, text_ids):
    model, ids = smol.model, text_ids[:300]
    tier = TIER.replace(token_budget=4096)
    fast = new_sparse_cache(model, tier, 400)
    try:
        c = model.cfg
        from tierkv.kv.caches.dense import DenseKVCache

        dense = DenseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32)
        assert greedy(model, fast, ids, 24) == greedy(model, dense, ids, 24)
        assert fast.stats()["dense_steps"] == 23 and fast.stats()["sparse_steps"] == 0
    finally:
        fast.close()


def test_sparse_cache_refuses_a_context_beyond_its_capacity(smol, text_ids):
    fast = new_sparse_cache(smol.model, TIER, 64)
    try:
        with pytest.raises(RuntimeError, match="holds 64 tokens"):
            prefill(smol.model, torch.tensor(text_ids[:100]), fast, 512)
    finally:
        fast.close()


def test_resident_values_change_no_token_and_spare_the_host_reads(smol, text_ids):
    model, ids, n = smol.model, text_ids[:1500], 24
    runs, stats = {}, {}
    for place in ("host", "half", "all"):
        cache = placed_cache(model, TIER, len(ids) + n + 1, place)
        try:
            runs[place] = greedy(model, cache, ids, n)
            stats[place] = cache.stats()
            start, end = cache.res.start * cache.chunk, cache.seq_len  # host rows past seq_len: never written
            if start < end:  # every write to a resident chunk reached the device copy
                flat = (cache.num_layers, -1, cache.hkv, cache.d)
                assert torch.equal(cache.res.v.view(flat)[:, :end - start], cache.v_host.view(flat)[:, start:end])
        finally:
            cache.close()
    assert runs["half"] == runs["host"] and runs["all"] == runs["host"]
    link = {p: st["total"]["bytes_moved"]["host->device"] for p, st in stats.items()}
    hit = {p: st["resident_values"]["hit_rate"] for p, st in stats.items()}
    # the resident half is the recent half, where most picks on real text fall
    assert hit["host"] == 0.0 and 0.5 < hit["half"] < 1.0 and hit["all"] == 1.0
    assert link["all"] < link["half"] < link["host"]
    picks = stats["all"]["total"]["hits"]
    assert picks["host"] == 0 and picks["gpu_resident"] > 0


@pytest.mark.cuda
@pytest.mark.parametrize("place", ["host", "cache", "half", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_gives_the_eager_run_tokens_on_cuda(smol_folder, text_ids, dtype, place):
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load(str(smol_folder), device="cuda", dtype=dtype)
    model, ids, n = llm.model, text_ids[:1500], 64
    eager = placed_cache(model, TIER, len(ids) + n + 1, place)
    graphed = placed_cache(model, TIER, len(ids) + n + 1, place)
    want = greedy(model, eager, ids, n)
    step = GraphStep(model, graphed)
    got = greedy(model, graphed, ids, n, step)
    assert step.replays > 40 and step.eager_steps >= 2  # the fit and the folds ran eagerly, the rest replayed
    assert got == want


@pytest.mark.cuda
@pytest.mark.parametrize("place", ["host", "cache", "half"])
def test_graph_replay_gives_the_eager_tokens_on_a_random_8b_shape(place):
    """Llama-3.1-8B shape, random bf16 weights, 8K synthetic tokens written straight into the cache."""
    model = random_8b()
    tier = TierConfig(attention="sparse", token_budget=1024)
    runs = []
    for graphed in (False, True):
        cache = placed_cache(model, tier, 8192 + 80, place)
        tokens, step = filled_decode(model, cache, graphed)
        runs.append(tokens)
        cache.close()
    assert step.replays >= 60
    assert runs[0] == runs[1]


def test_sparse_cache_refuses_a_cpu_budget_too_small_for_its_capacity(smol):
    from tierkv.errors import BudgetError

    with pytest.raises(BudgetError, match="cpu_budget=1.00 MiB cannot hold"):
        new_sparse_cache(smol.model, TIER.replace(cpu_budget=1024**2), 100_000)


def test_chunk_cache_and_repeat_tracking_change_no_token_and_the_cache_serves_every_repeat(smol, text_ids):
    model, ids, n = smol.model, text_ids[:1200], 12
    c = model.cfg
    plain = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                              config=TIER, capacity=len(ids) + n + 1, rope=model.rope, sparse=OPTS, chunk_cache=False)
    tracked = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                                config=TIER, capacity=len(ids) + n + 1, rope=model.rope, sparse=OPTS,
                                track_repeats=True, chunk_cache=True)
    try:
        assert greedy(model, tracked, ids, n) == greedy(model, plain, ids, n)
        st = tracked.stats()
        per_step = c.num_layers * c.num_kv_heads * tracked.max_picks
        assert 0 < st["picks"] <= (n - 1) * per_step
        assert 0 < st["picks_repeated"] < st["picks"]  # the first step has nothing to repeat
        assert 0.0 < st["repeat_rate"] < 1.0
        cc = st["chunk_cache"]  # the cache holds at least last step's picks, so every repeat is a hit
        assert cc["picks"] == st["picks"] and st["picks_repeated"] <= cc["hits"] < cc["picks"]
        link = st["total"]["bytes_moved"]["host->device"]
        plain_link = plain.stats()["total"]["bytes_moved"]["host->device"]
        assert 0 < link < plain_link <= (n - 1) * c.num_layers * c.num_kv_heads * TIER.token_budget * c.head_dim * 4 * 2
        assert "chunk_cache" not in plain.stats() and plain.stats()["total"]["hits"]["gpu_chunk_cache"] == 0
    finally:
        plain.close()
        tracked.close()


def test_long_prefill_slices_stream_the_context_in_spans_with_the_same_attention(smol, monkeypatch):
    """Past EXACT_SPAN keys a prefill slice attends span by span (merged by log-sum-exp) instead of copying and
    widening the whole context at once; the output equals the one-shot attention."""
    import tierkv.kv.caches.sparse as fs
    from tierkv.kernels.causal_attention import causal_attention

    model, gen = smol.model, torch.Generator().manual_seed(3)
    c = model.cfg
    cache = new_sparse_cache(model, TIER, 600)
    try:
        total, t = 530, 70
        for s in range(0, total, 265):
            kv = [torch.randn(265, c.num_kv_heads, c.head_dim, generator=gen) for _ in range(3)]
            cache.append(0, kv[0], kv[1], kv[2])
            cache.seq_len += 265  # layer 0 only: advance by hand
        q = torch.randn(t, c.num_heads, c.head_dim, generator=gen)
        k, v = cache._flat(cache.k_host, 0)[:total], cache._flat(cache.v_host, 0)[:total]
        want = causal_attention(q, k, v)
        monkeypatch.setattr(fs, "EXACT_SPAN", 128)  # spans of 128 keys: 4 full spans, 1 partial, the causal tail
        got = cache._attend_exact(0, q, total)
        assert (got - want).abs().max().item() < 1e-5
    finally:
        cache.close()


def test_outlier_keys_stay_on_the_device_when_keys_and_values_of_every_chunk_fit(smol, text_ids):
    """With every chunk an outlier (threshold 0: no key is rebuilt from the shadow), picks read exact keys; once the
    fit finds that and the budget holds keys and values of every chunk, keys join the resident values: same tokens,
    nothing read over the link. With room for values only, the keys still come from the host."""
    model, ids, n = smol.model, text_ids[:900], 12
    opts = SparseOptions(fold_tokens=32, outlier_threshold=0.0)
    runs, stats = {}, {}
    for place in ("host", "all", "all_kv"):
        cache = placed_cache(model, TIER, len(ids) + n + 1, place, sparse=opts)
        try:
            runs[place] = greedy(model, cache, ids, n)
            stats[place] = cache.stats()
            if cache.res.k is not None:
                flat, end = (cache.num_layers, -1, cache.hkv, cache.d), cache.seq_len
                assert torch.equal(cache.res.k.view(flat)[:, :end], cache.k_host.view(flat)[:, :end])
        finally:
            cache.close()
    assert stats["host"]["outlier_chunks"] > 0 and stats["host"]["total"]["hits"]["gpu_resident"] == 0
    assert runs["all"] == runs["host"] and runs["all_kv"] == runs["host"]
    assert not stats["all"]["resident_values"]["keys_too"] and stats["all_kv"]["resident_values"]["keys_too"]
    link = {p: st["total"]["bytes_moved"]["host->device"] for p, st in stats.items()}
    assert link["all_kv"] == 0 < link["all"] < link["host"]


def _held_bytes(cache) -> int:
    """Bytes of every tensor the cache holds but its host pool and the model's RoPE tables, each storage once."""
    skip = {t.untyped_storage().data_ptr() for t in (*cache._host, cache.rope.cos, cache.rope.sin)}
    seen, total, todo = set(skip), 0, [cache]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            if o.untyped_storage().data_ptr() not in seen:
                seen.add(o.untyped_storage().data_ptr())
                total += o.untyped_storage().nbytes()
        elif id(o) not in seen and (isinstance(o, (list, tuple, dict)) or type(o).__module__.startswith("tierkv.kv")):
            seen.add(id(o))
            todo += list(o.values()) if isinstance(o, dict) else list(o) if isinstance(o, (list, tuple)) \
                else list(vars(o).values())
    return total


def test_the_sparse_cache_stays_inside_kv_gpu_budget_after_the_fit(smol, text_ids):
    """The resident copies are sized before the fit makes the shadow and index bases (and the index's fp32 copy):
    they must leave room for them. Under a budget of the cache's own bytes plus 10 chunks of values, everything it
    holds after a prefill and 8 sparse steps stays inside the budget (the 16 GiB offload row went over by the
    bases, about 16 MB on the 8B shape)."""
    model, ids = smol.model, text_ids[:900]
    c = model.cfg
    probe = new_sparse_cache(model, TIER.replace(kv_gpu_budget=1), 1200)
    base = probe._device_bytes()
    probe.close()
    per_chunk = c.num_layers * TIER.chunk_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize
    budget = base + 10 * per_chunk
    cache = new_sparse_cache(model, TIER.replace(kv_gpu_budget=budget), 1200)
    try:
        greedy(model, cache, ids, 8)
        assert cache.fitted and cache.res.n == 9  # the tenth chunk of room is the scratch row
        assert cache._device_bytes() + cache.res.nbytes <= budget
        held = _held_bytes(cache)
        assert held <= budget, f"the cache holds {held - budget} bytes more than kv_gpu_budget"
    finally:
        cache.close()
