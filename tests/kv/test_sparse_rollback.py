"""A rollback past a fold (a chat turn re-rendering the last reply) undoes the fold instead of refitting, and the
cache then computes what a cache that never saw the removed tokens computes, bit for bit (random llama-tiny
weights, fp32, CPU)."""

import torch

from tierkv.config import TierConfig
from tierkv.engine import eager_step, prefill
from tierkv.kv.caches.base import copy_state
from tierkv.kv.sparse.options import SparseOptions
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config
from tests.kv.helpers import new_sparse_cache

TIER = TierConfig(attention="sparse", token_budget=128, sink_tokens=32, window_tokens=32, chunk_size=32)
OPTS = SparseOptions(fold_tokens=64)
PROMPT = 400  # the fit at the first sparse step covers [0, 384); decode folds [384, 448) at 448 tokens


def run(model, cache, ids, start, end):
    """Teacher-forced decode steps of ids[start:end]; their logits."""
    step = eager_step(model, cache)
    return [step(ids[p:p + 1], p) for p in range(start, end)]


def test_a_cut_below_a_fold_unfolds_and_continues_as_a_cache_that_never_went_further():
    model = random_model(shape_config("llama-tiny"), "cpu", torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (600,), generator=torch.Generator().manual_seed(0))
    a, b = new_sparse_cache(model, TIER, 640, sparse=OPTS), new_sparse_cache(model, TIER, 640, sparse=OPTS)
    try:
        for cache in (a, b):
            prefill(model, ids[:PROMPT], cache, 512)
        run(model, a, ids, PROMPT, 470)  # a decodes past the fold at 448 ...
        assert a.covered == 448 and a.stats()["folds"] == 1
        a.truncate(430)  # ... and a reply's rollback cuts below it
        run(model, b, ids, PROMPT, 430)  # b stops at the cut
        assert a.covered == b.covered == 384
        s = a.stats()
        assert (s["fits"], s["unfolds"]) == (1, 1)  # no refit
        # the next turn: a prompt of 50 tokens in one append (it folds at 480), then decode steps (a fold at 544)
        outs = []
        for cache in (a, b):
            first = prefill(model, ids[430:480], cache, 512)
            outs.append([first] + run(model, cache, ids, 480, 550))
        for x, y in zip(*outs):
            assert torch.equal(x, y)
        assert a.covered == b.covered == 544 and a.stats()["folds"] == b.stats()["folds"] + 1
        assert torch.equal(a.outlier, b.outlier) and torch.equal(a.covered_chunks, b.covered_chunks)
        for sa, sb in zip(a.shadows, b.shadows):
            assert torch.equal(sa.coeffs[:544], sb.coeffs[:544]) and torch.equal(sa.chunk_err, sb.chunk_err)
    finally:
        a.close()
        b.close()


def test_a_cut_below_the_fit_or_below_an_overwritten_ring_refits():
    model = random_model(shape_config("llama-tiny"), "cpu", torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (640,), generator=torch.Generator().manual_seed(1))
    cache = new_sparse_cache(model, TIER.replace(prefill_chunk=64), 640, sparse=OPTS)  # a ring of 192 keys
    try:
        prefill(model, ids[:PROMPT], cache, 64)
        run(model, cache, ids, PROMPT, 460)
        cache.truncate(399)  # below the fit's tokens
        assert not cache.fitted
        run(model, cache, ids, 399, 460)  # refits at the first step
        assert cache.stats()["fits"] == 2 and cache.covered == 448
        cache.truncate(450)
        assert cache.covered == 448  # a cut above every fold keeps them
        prefill(model, ids[450:630], cache, 64)  # the ring wraps past the keys folded at 448
        assert cache.covered == 576
        cache.truncate(440)
        assert not cache.fitted and cache.stats()["unfolds"] == 0
    finally:
        cache.close()


def test_a_copied_state_keeps_its_fold_history_so_the_copy_unfolds_too():
    """A resumed session or a cache grown into a larger class (copy_state) undoes a fold as the live cache would;
    a state saved without fold starts (before they were kept) still loads, and such a cut refits."""
    model = random_model(shape_config("llama-tiny"), "cpu", torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (600,), generator=torch.Generator().manual_seed(2))
    a, b = new_sparse_cache(model, TIER, 640, sparse=OPTS), new_sparse_cache(model, TIER, 640, sparse=OPTS)
    copies = [new_sparse_cache(model, TIER, 640, sparse=OPTS) for _ in range(2)]
    try:
        for cache in (a, b):
            prefill(model, ids[:PROMPT], cache, 512)
        run(model, a, ids, PROMPT, 470)  # folds [384, 448) at 448
        run(model, b, ids, PROMPT, 430)
        state = a.extra_state()
        assert state["sparse.fold_starts"].tolist() == [384]
        assert state["sparse.0.k_pre"].shape[0] == 470 - 384  # the fold's keys travel with the unfolded ones
        copy_state(a, copies[0])
        copies[0].truncate(430)
        assert copies[0].covered == 384 and copies[0].fitted and copies[0].stats()["unfolds"] == 1
        outs = [run(model, cache, ids, 430, 500) for cache in (copies[0], b)]
        for x, y in zip(*outs):
            assert torch.equal(x, y)
        for sa, sb in zip(copies[0].shadows, b.shadows):
            assert torch.equal(sa.coeffs[:sa.covered], sb.coeffs[:sb.covered]) and sa.covered == sb.covered

        old = {k: v for k, v in state.items() if k != "sparse.fold_starts"}  # the earlier layout
        for layer in range(a.num_layers):
            old[f"sparse.{layer}.k_pre"] = old[f"sparse.{layer}.k_pre"][448 - 384:]  # unfolded keys only
        copies[1].begin_import(470)
        for layer in range(a.num_layers):
            copies[1].import_kv(layer, 0, a.export_kv(layer, 0, 470))
        copies[1].finish_import(470)
        copies[1].load_extra_state(old)
        assert copies[1].covered == 448
        copies[1].truncate(430)
        assert not copies[1].fitted and copies[1].stats()["unfolds"] == 0
    finally:
        for cache in (a, b, *copies):
            cache.close()
