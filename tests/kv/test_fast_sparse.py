"""FastSparseKVCache: the graph-safe sparse cache gives SparseKVCache's tokens (same plan, scorer, fold rule and
key rebuild) on the real model; on CUDA its captured step gives the same tokens as running it eagerly."""

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.engine import eager_step, generate_ids, prefill, GenStats
from tierkv.kv.fast_sparse import FastSparseKVCache
from tierkv.kv.sparse import SparseKVCache, SparseOptions

# small sinks/window and an absolute budget so that decode picks a few of ~45 candidate chunks per head, and a
# small fold interval so that new keys are folded into the shadows during the run
TIER = TierConfig(attention="sparse", token_budget=320, sink_tokens=32, window_tokens=64, chunk_size=32)
OPTS = SparseOptions(fold_tokens=32)


def greedy(model, cache, ids, n, step=None):
    logits = prefill(model, torch.tensor(ids, device=model.device), cache, 512)
    step = step or eager_step(model, cache)
    return list(generate_ids(step, logits, len(ids), n, set(), GenStats()))


def fast_cache(model, tier, capacity, chunk_cache=False):
    c = model.cfg
    return FastSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                             config=tier, capacity=capacity, rope=model.rope, sparse=OPTS, chunk_cache=chunk_cache)


def test_fast_sparse_gives_the_sparse_cache_tokens_on_smollm2(smol, text_ids):
    model, ids, n = smol.model, text_ids[:1500], 48
    c = model.cfg
    ref = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32, config=TIER,
                        rope=model.rope, sparse=OPTS)
    fast = fast_cache(model, TIER, len(ids) + n + 1, chunk_cache=True)  # the cache path against the reference
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


def test_fast_sparse_is_exact_while_the_budget_covers_the_context(smol, text_ids):
    model, ids = smol.model, text_ids[:300]
    tier = TIER.replace(token_budget=4096)
    fast = fast_cache(model, tier, 400)
    try:
        c = model.cfg
        from tierkv.kv.cache import DenseKVCache

        dense = DenseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32)
        assert greedy(model, fast, ids, 24) == greedy(model, dense, ids, 24)
        assert fast.stats()["dense_steps"] == 23 and fast.stats()["sparse_steps"] == 0
    finally:
        fast.close()


def test_fast_sparse_refuses_a_context_beyond_its_capacity(smol, text_ids):
    fast = fast_cache(smol.model, TIER, 64)
    try:
        with pytest.raises(RuntimeError, match="holds 64 tokens"):
            prefill(smol.model, torch.tensor(text_ids[:100]), fast, 512)
    finally:
        fast.close()


@pytest.mark.cuda
@pytest.mark.parametrize("chunk_cache", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_gives_the_eager_fast_sparse_tokens_on_cuda(smol_folder, text_ids, dtype, chunk_cache):
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load(str(smol_folder), device="cuda", dtype=dtype)
    model, ids, n = llm.model, text_ids[:1500], 64
    eager = fast_cache(model, TIER, len(ids) + n + 1, chunk_cache)
    graphed = fast_cache(model, TIER, len(ids) + n + 1, chunk_cache)
    want = greedy(model, eager, ids, n)
    step = GraphStep(model, graphed)
    got = greedy(model, graphed, ids, n, step)
    assert step.replays > 40 and step.eager_steps >= 2  # the fit and the folds ran eagerly, the rest replayed
    assert got == want


@pytest.mark.cuda
@pytest.mark.parametrize("chunk_cache", [False, True])
def test_graph_replay_gives_the_eager_tokens_on_a_random_8b_shape(chunk_cache):
    """Llama-3.1-8B shape, random bf16 weights, 8K synthetic tokens written straight into the cache."""
    import sys
    from pathlib import Path

    from tierkv.graph import GraphStep
    from tierkv.models.build import random_model
    from tierkv.models.shapes import shape_config

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from fast_decode import fill

    model = random_model(shape_config("llama3.1-8b"), torch.device("cuda"), torch.bfloat16)
    tier = TierConfig(attention="sparse", token_budget=1024)
    runs = []
    for graphed in (False, True):
        cache = fast_cache(model, tier, 8192 + 80, chunk_cache)
        fill(cache, model, 8192, seed=1)
        tok, out = torch.zeros(1, dtype=torch.long, device="cuda"), []
        step = GraphStep(model, cache) if graphed else (lambda t, p, c=cache: model.forward(t, c.pos, c))
        for _ in range(64):
            tok = step(tok, cache.seq_len).argmax(-1).view(1)
            out.append(int(tok))
        runs.append(out)
        cache.close()
    assert step.replays >= 60
    assert runs[0] == runs[1]


def test_fast_sparse_refuses_a_cpu_budget_too_small_for_its_capacity(smol):
    from tierkv.errors import BudgetError

    with pytest.raises(BudgetError, match="cpu_budget=1.00 MiB cannot hold"):
        fast_cache(smol.model, TIER.replace(cpu_budget=1024**2), 100_000)


def test_chunk_cache_and_repeat_tracking_change_no_token_and_the_cache_serves_every_repeat(smol, text_ids):
    model, ids, n = smol.model, text_ids[:1200], 12
    c = model.cfg
    plain = FastSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                              config=TIER, capacity=len(ids) + n + 1, rope=model.rope, sparse=OPTS, chunk_cache=False)
    tracked = FastSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
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
