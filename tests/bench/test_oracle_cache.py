"""The fidelity benches' selection oracle: the shipped plan's sinks, window and budget, and per KV head the chunks
of most true attention mass, attended exactly; sliding layers and prefill as full attention."""

import math

import pytest
import torch

from tierkv.bench.oracle_cache import OracleKVCache, oracle_keep
from tierkv.config import TierConfig
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.sparse.select import plan_selection

C, SINKS, WINDOW = 4, 4, 8  # one sink chunk, two window chunks


def filled(cls, k, v, **kw):
    """A cache holding k, v (T, Hkv, D) as the previous tokens of a one-layer model (plus layer 1, windowed)."""
    cache = cls(2, k.shape[1], k.shape[2], device="cpu", dtype=torch.float32, capacity=k.shape[0] + 1,
                windows=(None, 6), **kw)
    for layer in range(2):
        cache.append(layer, k[:-1], v[:-1])
    cache.advance(k.shape[0] - 1)
    for layer in range(2):
        cache.append(layer, k[-1:], v[-1:])
    return cache


def brute_force(q, k, v, budget):
    """Attention of q (1, Hq, D) over the sinks, window, open chunk and the top-mass chunks, by loops."""
    total, hkv, d = k.shape
    group = q.shape[1] // hkv
    plan = plan_selection(total, C, SINKS, WINDOW, budget)
    out = torch.empty_like(q)
    for h in range(hkv):
        scores = torch.stack([k[:, h] @ q[0, h * group + g] / math.sqrt(d) for g in range(group)])  # (G, total)
        mass = scores.softmax(-1).sum(0)
        cands = range(plan.sink_end, plan.window_start)
        best = sorted(cands, key=lambda ch: -mass[ch * C:(ch + 1) * C].sum().item())[:plan.picks]
        keep = [p for p in range(total) if p < plan.sink_end * C or p >= plan.window_start * C or p // C in best]
        for g in range(group):
            w = scores[g, keep].softmax(-1)
            out[0, h * group + g] = w @ v[keep, h]
    return out, plan


@pytest.mark.parametrize("budget", [24, 0.5])
def test_oracle_attends_the_top_mass_chunks_exactly(budget):
    torch.manual_seed(0)
    total, hkv, hq, d = 4 * 11 + 3, 2, 4, 8  # 11 sealed chunks and an open one of 3 tokens
    k, v, q = torch.randn(total, hkv, d) * 2, torch.randn(total, hkv, d), torch.randn(1, hq, d)
    # the fraction alone (no 2,048-token floor): at 47 tokens the floor would attend every chunk
    tier = TierConfig(chunk_size=C, sink_tokens=SINKS, window_tokens=WINDOW, token_budget=budget, budget_floor_tokens=0)
    cache = filled(OracleKVCache, k, v, tier=tier)
    want, plan = brute_force(q, k, v, tier.budget_tokens(total))
    assert 0 < plan.picks < plan.candidates  # a real selection, not the dense fallback
    assert torch.allclose(cache.attend(0, q), want, atol=1e-5)
    assert cache.steps == {"sparse_steps": 1, "dense_steps": 0}
    # the windowed layer attends its window exactly, as full attention does
    dense = filled(DenseKVCache, k, v)
    assert torch.equal(cache.attend(1, q), dense.attend(1, q))
    # the whole context under budget: exact attention
    whole = filled(OracleKVCache, k, v, tier=tier.replace(token_budget=total))
    assert torch.allclose(whole.attend(0, q), dense.attend(0, q), atol=1e-6)
    assert whole.steps == {"sparse_steps": 0, "dense_steps": 1}


def test_keep_mask_is_sinks_window_and_each_heads_own_picks():
    plan = plan_selection(4 * 10 + 2, C, SINKS, WINDOW, 4 + 8 + 2 + 2 * C)  # room for two picks
    assert (plan.sink_end, plan.window_start, plan.picks) == (1, 8, 2)
    mass = torch.rand(2, 42) * 0.01
    mass[0, 4 * 3:4 * 4] += 1  # head 0: chunks 3 and 6; head 1: chunks 1 and 7
    mass[0, 4 * 6:4 * 7] += 0.5
    mass[1, 4 * 1:4 * 2] += 1
    mass[1, 4 * 7:4 * 8] += 0.7
    mass[:, :4] += 5  # heavy sinks and window never take a pick's place
    mass[:, 32:] += 5
    keep = oracle_keep(mass, plan)
    chunks = [sorted({p // C for p in range(42) if keep[h, p]}) for h in range(2)]
    assert chunks == [[0, 3, 6, 8, 9, 10], [0, 1, 7, 8, 9, 10]]
