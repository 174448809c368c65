"""Layer-after-layer prefill into the sparse graph cache equals the slice-after-slice prefill: the same logits,
host pool, shadows and index (fitted as the prefill ends instead of at the first step), and the same tokens."""

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.sparse.options import SparseOptions

TIER = TierConfig(attention="sparse", token_budget=320, sink_tokens=32, window_tokens=64, chunk_size=32)
OPTS = SparseOptions(fold_tokens=32)
N_NEW = 12
pytestmark = pytest.mark.slow  # the real model


def _cache(model, capacity):
    c = model.cfg
    return SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                         config=TIER, capacity=capacity, rope=model.rope, sparse=OPTS)


@pytest.fixture(scope="module")
def runs(smol, text_ids):
    """Prefill 1,110 tokens of real text (a fold falls at step 10) both ways (slices of 512), then decode N_NEW tokens greedily."""
    model, ids = smol.model, torch.tensor(text_ids[:1110])
    out = {}
    for by_layer in (True, False):
        cache = _cache(model, len(ids) + N_NEW + 1)
        logits = prefill(model, ids, cache, 512, by_layer=by_layer)
        fitted_at_prefill_end = cache.fitted
        rows = lambda pool: pool.view(pool.shape[0], -1, *pool.shape[-2:])[:, :len(ids)].clone()  # written rows only
        snap = {"logits": logits, "k": rows(cache.k_host), "v": rows(cache.v_host)}
        toks = list(generate_ids(eager_step(model, cache), logits, len(ids), N_NEW, set(), GenStats()))
        snap.update(tokens=toks, fitted_early=fitted_at_prefill_end, stats=cache.stats(),
                    shadow=[sh.coeffs[:sh.covered].clone() for sh in cache.shadows],
                    index=[ix.coeffs.clone() for ix in cache.index], outliers=cache.outlier.clone())
        cache.close()
        out[by_layer] = snap
    return out


def test_same_logits_and_pool(runs):
    a, b = runs[True], runs[False]
    print("max |logits diff|", (a["logits"] - b["logits"]).abs().max().item())
    assert torch.equal(a["logits"], b["logits"])
    assert torch.equal(a["k"], b["k"]) and torch.equal(a["v"], b["v"])


def test_fit_happens_at_prefill_end_with_the_same_result(runs):
    a, b = runs[True], runs[False]
    assert a["fitted_early"] and not b["fitted_early"]  # the sliced prefill fits at the first sparse step
    assert a["stats"]["layer_prefills"] == 1 and "layer_prefills" not in b["stats"]
    for sa, sb in zip(a["shadow"], b["shadow"]):
        assert torch.equal(sa, sb)
    for ia, ib in zip(a["index"], b["index"]):
        assert torch.equal(ia[..., :1110 + N_NEW - 1, :], ib[..., :1110 + N_NEW - 1, :])
    assert torch.equal(a["outliers"], b["outliers"])


def test_same_tokens_with_every_step_sparse(runs):
    a, b = runs[True], runs[False]
    assert a["tokens"] == b["tokens"]
    assert a["stats"]["sparse_steps"] == b["stats"]["sparse_steps"] == N_NEW - 1
    assert a["stats"]["folds"] == b["stats"]["folds"] >= 1


class _WholeLayerCache(SparseKVCache):
    """The sparse cache with the whole-layer attention CUDA takes (one causal call per layer), on any device."""

    def attends_whole_layer(self, layer: int) -> bool:
        return self.staging is not None


def test_whole_layer_attention_matches_the_sliced_prefill(smol, text_ids, runs):
    model, ids = smol.model, torch.tensor(text_ids[:1110])
    c = model.cfg
    cache = _WholeLayerCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                             config=TIER, capacity=len(ids) + N_NEW + 1, rope=model.rope, sparse=OPTS)
    logits = prefill(model, ids, cache, 512, by_layer=True)
    rows = lambda pool: pool.view(pool.shape[0], -1, *pool.shape[-2:])[:, :len(ids)]
    b = runs[False]
    diff = (logits - b["logits"]).abs().max().item()
    print("max |logits diff| whole-layer vs sliced", diff)
    assert diff < 1e-3 and cache.fitted
    assert torch.allclose(rows(cache.k_host), b["k"], atol=1e-4) and torch.allclose(rows(cache.v_host), b["v"], atol=1e-4)
    toks = list(generate_ids(eager_step(model, cache), logits, len(ids), N_NEW, set(), GenStats()))
    cache.close()
    assert toks == b["tokens"]
