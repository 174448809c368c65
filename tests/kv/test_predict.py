"""Prefetch of the next layer's predicted picks (kv/sparse/predict.py): it changes no token, its accuracy is measured
(SmolLM2 on real text predicts most picks from the residual one layer early), and what it copies is counted as
link bytes."""

import pytest
import torch

from tierkv.kv.caches.sparse import SparseKVCache

from tests.kv.helpers import OPTS, TIER, new_sparse_cache, filled_decode, greedy, random_8b


def prefetching(model, tier, capacity, kv_gpu_budget=None):
    c = model.cfg
    return SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                         config=tier.replace(kv_gpu_budget=kv_gpu_budget), capacity=capacity, rope=model.rope,
                         sparse=OPTS, prefetch=True)


@pytest.mark.parametrize("resident", [False, True])
def test_prefetch_changes_no_token_and_predicts_most_picks_on_real_text(smol, text_ids, resident):
    model, ids, n = smol.model, text_ids[:1500], 16
    plain = new_sparse_cache(model, TIER, len(ids) + n + 1)
    budget = None
    if resident:  # values of the last half of the chunks resident: their picks are never copied
        probe = prefetching(model, TIER, len(ids) + n + 1, 1)
        per_chunk = probe._chunk_bytes()
        budget = probe._device_bytes() + (probe.n_chunks // 2 + 1) * per_chunk
        probe.close()
    pre = prefetching(model, TIER, len(ids) + n + 1, budget)
    try:
        assert greedy(model, pre, ids, n) == greedy(model, plain, ids, n)
        st = pre.stats()
        p, cache = st["prefetch"], st["chunk_cache"]
        assert pre.res.n == (pre.n_chunks // 2 if resident else 0)
        assert p["picks"] > 0 and p["accuracy"] > 0.6  # layers 1.. of the sparse steps after the fit
        assert p["chunks_copied"] > 0 and p["bytes"] >= p["chunks_copied"] * pre.chunk * pre.d * 4
        assert cache["hits"] > 0
        plain_link = plain.stats()["total"]["bytes_moved"]["host->device"]
        assert st["total"]["bytes_moved"]["host->device"] >= p["bytes"]
        if not resident:  # every pick the real step needed either was copied ahead, cached before, or crossed then
            assert st["total"]["bytes_moved"]["host->device"] - p["bytes"] < plain_link
    finally:
        plain.close()
        pre.close()


@pytest.mark.cuda
def test_graph_replay_with_prefetch_gives_the_eager_tokens_on_cuda(smol_folder, text_ids):
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load(str(smol_folder), device="cuda", dtype=torch.bfloat16)
    model, ids, n = llm.model, text_ids[:1500], 64
    runs = []
    for graphed in (False, True):
        cache = prefetching(model, TIER, len(ids) + n + 1)
        step = GraphStep(model, cache) if graphed else None
        runs.append(greedy(model, cache, ids, n, step))
        assert cache.stats()["prefetch"]["accuracy"] > 0.6
        cache.close()
    assert step.replays > 40 and runs[0] == runs[1]


@pytest.mark.cuda
def test_graph_replay_with_prefetch_gives_the_eager_tokens_on_a_random_8b_shape():
    from tierkv.config import TierConfig

    model = random_8b()
    tier = TierConfig(attention="sparse", token_budget=1024)
    runs = []
    for graphed in (False, True):
        cache = prefetching(model, tier, 8192 + 80, kv_gpu_budget=1)  # nothing resident: every pick crosses
        tokens, step = filled_decode(model, cache, graphed)
        runs.append(tokens)
        cache.close()
    assert step.replays >= 60 and runs[0] == runs[1]
