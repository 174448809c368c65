"""The fixed-capacity cache behind graph decode gives the same tokens as the growing dense cache."""

from __future__ import annotations

import pytest
import torch

from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.static import StaticKVCache


def _greedy(llm, cache, prompt, n, step_factory=eager_step):
    x = torch.tensor(prompt, device=llm.device)
    logits = prefill(llm.model, x, cache, 64)
    return list(generate_ids(step_factory(llm.model, cache), logits, len(prompt), n, set(), GenStats()))


def _caches(llm, capacity):
    c = llm.cfg
    args = (c.num_layers, c.num_kv_heads, c.head_dim)
    return (DenseKVCache(*args, device=llm.device, dtype=llm.dtype, capacity=8),
            StaticKVCache(*args, device=llm.device, dtype=llm.dtype, capacity=capacity))


def test_static_cache_matches_dense(smol, text_ids):
    prompt = text_ids[:150]
    dense, static = _caches(smol, 150 + 24)
    assert _greedy(smol, static, prompt, 24) == _greedy(smol, dense, prompt, 24)
    assert int(static.pos) == static.seq_len == 150 + 23


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_decode_matches_eager_on_cuda(smol_folder, text_ids, dtype):
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load(str(smol_folder), device="cuda", dtype=dtype)
    prompt = text_ids[:300]
    _, eager_cache = _caches(llm, 300 + 64)
    _, graph_cache = _caches(llm, 300 + 64)
    eager = _greedy(llm, eager_cache, prompt, 64)
    graphed = _greedy(llm, graph_cache, prompt, 64, GraphStep)
    assert graphed == eager


@pytest.mark.cuda
def test_graph_decode_matches_eager_on_random_8b_shape():
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load("llama3.1-8b", device="cuda", dtype="bf16")
    prompt = torch.randint(0, llm.cfg.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    _, eager_cache = _caches(llm, 1024 + 64)
    _, graph_cache = _caches(llm, 1024 + 64)
    eager = _greedy(llm, eager_cache, prompt, 64)
    graphed = _greedy(llm, graph_cache, prompt, 64, GraphStep)
    assert graphed == eager
