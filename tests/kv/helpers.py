"""Helpers of the sparse graph cache's tests (test_sparse_cache, test_disk_placement, test_predict) that are not fixtures: the
settings they share, greedy decoding through a cache, caches placed on the host, resident or with the chunk cache,
and the random 8B-shape model for the CUDA tests."""

import torch

from tierkv.config import TierConfig
from tierkv.engine import eager_step, generate_ids, prefill, GenStats
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.sparse.options import SparseOptions

# small sinks/window and an absolute budget so that decode picks a few of ~45 candidate chunks per head, and a
# small fold interval so that new keys are folded into the shadows during the run
TIER = TierConfig(attention="sparse", token_budget=320, sink_tokens=32, window_tokens=64, chunk_size=32)
OPTS = SparseOptions(fold_tokens=32)


def greedy(model, cache, ids, n, step=None):
    """Prefill ids into cache, then n greedy tokens by `step` (default: eager steps)."""
    logits = prefill(model, torch.tensor(ids, device=model.device), cache, 512)
    step = step or eager_step(model, cache)
    return list(generate_ids(step, logits, len(ids), n, set(), GenStats()))


def new_sparse_cache(model, tier, capacity, chunk_cache=False, sparse=OPTS):
    """A SparseKVCache for model holding up to capacity tokens."""
    c = model.cfg
    return SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                             config=tier, capacity=capacity, rope=model.rope, sparse=sparse, chunk_cache=chunk_cache)


def placed_cache(model, tier, capacity, place, sparse=OPTS):
    """A sparse cache whose values are all on the host ("host"), half ("half") or all ("all") resident on the
    compute device too, room for keys and values of every chunk ("all_kv"), or with the chunk cache ("cache"):
    kv_gpu_budget sized from the cache's own bytes."""
    if place == "cache":
        return new_sparse_cache(model, tier, capacity, chunk_cache=True, sparse=sparse)
    probe = new_sparse_cache(model, tier.replace(kv_gpu_budget=1), capacity, sparse=sparse)
    base, n, probe_res = probe._device_bytes(), probe.n_chunks, probe.res.n
    probe.close()
    assert probe_res == 0  # a budget below the shadows leaves no room for values
    c = model.cfg
    per_chunk = c.num_layers * tier.chunk_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize
    # all_kv: keys and values of every chunk, plus their scratch rows (the bases the fit adds are in `base`)
    want = {"host": 0, "half": n // 2, "all": n, "all_kv": 2 * n + 1}[place]
    cache = new_sparse_cache(model, tier.replace(kv_gpu_budget=base + (want + 1) * per_chunk), capacity, sparse=sparse)
    assert cache.res.n == min(want, n)
    return cache


def random_8b():
    """Llama-3.1-8B shape with random bf16 weights on CUDA."""
    from tierkv.models.build import random_model
    from tierkv.models.shapes import shape_config

    return random_model(shape_config("llama3.1-8b"), torch.device("cuda"), torch.bfloat16)


def filled_decode(model, cache, graphed, n=64):
    """Write 8K synthetic tokens (bench/fast_decode.py's fill) into cache, then decode n greedy tokens by graph
    replays or eagerly. Returns (tokens, the graph step or None)."""
    import sys
    from pathlib import Path

    from tierkv.graph import GraphStep

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from fast_decode import fill

    fill(cache, model, 8192, seed=1)
    tok, out = torch.zeros(1, dtype=torch.long, device="cuda"), []
    step = GraphStep(model, cache) if graphed else None
    for _ in range(n):
        logits = step(tok, cache.seq_len) if graphed else model.forward(tok, cache.pos, cache)
        tok = logits.argmax(-1).view(1)
        out.append(int(tok))
    return out, step
