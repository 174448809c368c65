"""The cache factory: one rule maps settings, device, graph setting and use to the documented cache kind, and the
cache it builds reports that choice in the stats schema every cache shares."""

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.errors import ConfigError
from tierkv.kv.factory import CacheRequest, build_cache, capacity_class, choose
from tierkv.models.config import ModelConfig
from tierkv.models.rope import Rope

CFG = ModelConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                  tie_word_embeddings=False, name="tiny")
SPARSE = dict(attention="sparse", chunk_size=8, sink_tokens=8, window_tokens=8, token_budget=32)
BUDGETS = dict(kv_gpu_budget="1MiB", cpu_budget="4MiB")

# (tier settings, device, graph, use) -> (kind, decode captured)
TABLE = [
    ({}, "cpu", True, "generate", "dense", False),
    ({}, "cpu", True, "chat", "dense", False),
    ({}, "cpu", True, "score", "dense", False),
    ({}, "cuda", True, "generate", "static", True),
    ({}, "cuda", True, "chat", "static", True),
    ({}, "cuda", False, "generate", "dense", False),
    (BUDGETS, "cpu", True, "generate", "tiered", False),
    (BUDGETS, "cuda", True, "chat", "tiered", False),
    ({"disk_dir": "/tmp/x"}, "cuda", True, "score", "tiered", False),
    (SPARSE, "cuda", True, "generate", "sparse", True),
    (SPARSE, "cuda", True, "chat", "sparse", True),
    (SPARSE, "cuda", True, "score", "sparse", True),
    (SPARSE, "cuda", False, "chat", "sparse", False),
    (SPARSE, "cpu", True, "generate", "sparse", False),
    (SPARSE, "cpu", True, "chat", "sparse", False),
    (SPARSE, "cpu", True, "score", "sparse", False),
    ({**SPARSE, **BUDGETS, "disk_dir": "/tmp/x"}, "cpu", True, "chat", "sparse", False),
]


def request(tier: dict, device: str, graph: bool, use: str, capacity: int = 64) -> CacheRequest:
    return CacheRequest(tier=TierConfig(**tier), model=CFG, device=torch.device(device), dtype=torch.float32,
                        graph=graph, use=use, capacity=capacity)


@pytest.mark.parametrize("tier,device,graph,use,kind,captured", TABLE)
def test_the_factory_picks_the_documented_cache(tier, device, graph, use, kind, captured):
    choice = choose(request(tier, device, graph, use))
    assert (choice.kind, choice.captured) == (kind, captured)
    assert choice.reason  # stats report why


def test_an_unknown_use_is_refused():
    with pytest.raises(ConfigError, match="cache use 'train' is unknown"):
        choose(request({}, "cpu", True, "train"))


@pytest.mark.parametrize("tier,kind", [({}, "dense"), (BUDGETS, "tiered"), (SPARSE, "sparse")])
def test_every_built_cache_reports_the_shared_stats_schema(tier, kind):
    req = request(tier, "cpu", True, "generate")
    cache, choice = build_cache(req, Rope(CFG, torch.device("cpu"), torch.float32, length=128))
    try:
        k = torch.randn(3, CFG.num_kv_heads, CFG.head_dim)
        for layer in range(CFG.num_layers):
            cache.append(layer, k, k, k)
            cache.attend(layer, torch.randn(3, CFG.num_heads, CFG.head_dim))
        cache.advance(3)
        s = cache.stats()
        assert {"cache", "path", "seq_len", "tier_bytes", "budget_bytes"} <= set(s)
        assert s["cache"] == choice.kind == kind and s["path"] == choice.as_dict()
        assert s["seq_len"] == 3 and set(s["tier_bytes"]) == {"device", "host", "disk"}
    finally:
        cache.close()


@pytest.mark.parametrize("need,cls", [(1, 1024), (1024, 1024), (1025, 1280), (2049, 2560), (40000, 40960)])
def test_capacity_classes_are_quarter_octaves_from_1024(need, cls):
    assert capacity_class(need, 1 << 20) == cls
    assert capacity_class(need, 1000) == max(1000, need)  # never past the model's context (unless asked)
