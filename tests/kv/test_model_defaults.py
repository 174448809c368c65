"""Narrow keys stay exact: the sparse settings tierkv.load and the bench give a model by its key width."""

import torch

import tierkv
from tierkv.bench.systems import DecodeSpec, tier_config
from tierkv.config import TierConfig
from tierkv.kv.sparse.model_defaults import model_sparse_defaults, with_model_defaults
from tierkv.models.shapes import shape_config


def test_narrow_keys_get_exact_keys_and_small_chunks():
    gemma = shape_config("gemma3-270m")  # 1 KV head x 256
    assert model_sparse_defaults(gemma) == {"rank": 256, "score_rank": 128, "chunk_size": 16}
    tiny = shape_config("llama-tiny")  # 2 x 16
    assert model_sparse_defaults(tiny) == {"rank": 32, "score_rank": 16, "chunk_size": 16}
    assert model_sparse_defaults(shape_config("llama3.1-8b")) == {}  # 8 x 128: the shadow and TierConfig's defaults


def test_given_fields_win():
    gemma = shape_config("gemma3-270m")
    tier = with_model_defaults(TierConfig(chunk_size=32, rank=96), gemma, {"chunk_size": 32, "rank": 96})
    assert (tier.rank, tier.score_rank, tier.chunk_size) == (96, 128, 32)
    wide = TierConfig()
    assert with_model_defaults(wide, shape_config("llama3.1-8b"), {}) is wide


def test_load_and_bench_use_the_model_defaults():
    llm = tierkv.load("llama-tiny", device="cpu", warm_up=False)
    assert (llm.tier.rank, llm.tier.score_rank, llm.tier.chunk_size) == (32, 16, 16)
    llm = tierkv.load("llama-tiny", device="cpu", warm_up=False, chunk_size=32, score_rank=8)
    assert (llm.tier.rank, llm.tier.score_rank, llm.tier.chunk_size) == (32, 8, 32)
    spec = DecodeSpec(model="llama-tiny", contexts=[1024], device=torch.device("cpu"), dtype=torch.float32)
    for system in ("tierkv-sparse", "tierkv-exact", "tierkv-dense"):
        tier = tier_config(system, spec, 1 << 20, llm.cfg)
        assert (tier.rank, tier.score_rank, tier.chunk_size) == (32, 16, 16), system
    spec = DecodeSpec(model="llama-tiny", contexts=[1024], device=torch.device("cpu"), dtype=torch.float32,
                      rank=8, chunk_size=64)
    tier = tier_config("tierkv-sparse", spec, 1 << 20, llm.cfg)
    assert (tier.rank, tier.score_rank, tier.chunk_size) == (8, 16, 64)
