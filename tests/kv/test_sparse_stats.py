"""The graph sparse cache's stats say which budget it runs with and how many tokens that is at its length
(random llama-tiny weights, fp32, CPU)."""

import torch

from tierkv.config import TierConfig
from tierkv.engine import prefill
from tierkv.kv.sparse.options import SparseOptions
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config
from tests.kv.helpers import new_sparse_cache

TIER = TierConfig(attention="sparse", token_budget=128, sink_tokens=32, window_tokens=32, chunk_size=32)
OPTS = SparseOptions(fold_tokens=64)

def test_stats_name_the_budget_and_the_tokens_it_attends_at_this_length():
    model = random_model(shape_config("llama-tiny"), "cpu", torch.float32)
    ids = torch.randint(0, model.cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(3))
    for tier, want in ((TIER.replace(token_budget=0.125, budget_floor_tokens=0), 50),
                       (TIER.replace(token_budget=0.125, budget_floor_tokens=256), 256), (TIER, 128)):
        cache = new_sparse_cache(model, tier, 640, sparse=OPTS)
        try:
            prefill(model, ids, cache, 512)
            s = cache.stats()
            assert (s["token_budget"], s["budget_floor_tokens"]) == (tier.token_budget, tier.budget_floor_tokens)
            assert s["budget_tokens"] == want  # 1/8 of 400 tokens, the floor above it, or the fixed count
        finally:
            cache.close()
