"""TierConfig: sizes parsed, every bad field refused with a one-line ConfigError naming it."""

import pytest

from tierkv.config import TierConfig
from tierkv.errors import ConfigError


def test_sizes_and_defaults():
    cfg = TierConfig(kv_gpu_budget="512MiB", cpu_budget="1.5GB")
    assert (cfg.kv_gpu_budget, cfg.cpu_budget) == (512 * 1024**2, 1_500_000_000)
    assert cfg.gpu_chunk_cache is False and cfg.replace(gpu_chunk_cache=True).gpu_chunk_cache is True


@pytest.mark.parametrize("field,value", [("rank", 0), ("score_rank", 0), ("chunk_size", -1), ("attention", "dense"),
                                         ("sink_tokens", -1), ("token_budget", 1.5), ("gpu_chunk_cache", 1),
                                         ("budget_floor_tokens", -1), ("budget_floor_tokens", 2048.0),
                                         ("budget_floor_tokens", True), ("budget_floor_tokens", "2048")])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field) as err:
        TierConfig(**{field: value})
    assert "\n" not in str(err.value)


def test_bad_floor_says_the_fix():
    with pytest.raises(ConfigError, match=r"^budget_floor_tokens=-1 must be a token count \(int >= 0\); use 0 for the "
                                          r"fraction of the context alone$"):
        TierConfig(budget_floor_tokens=-1)


@pytest.mark.parametrize("context,tokens", [(4096, 2048), (16384, 2048), (32768, 4096), (131072, 16384)])
def test_default_budget_is_an_eighth_of_the_context_and_at_least_2048_tokens(context, tokens):
    assert (TierConfig().token_budget, TierConfig().budget_floor_tokens) == (0.125, 2048)
    assert TierConfig().budget_tokens(context) == tokens
    assert TierConfig(attention="sparse").budget_tokens(context) == tokens


@pytest.mark.parametrize("context", [100, 4096, 16384, 32768, 131072])
def test_floor_leaves_token_counts_alone_and_zero_gives_the_fraction(context):
    assert TierConfig(token_budget=512).budget_tokens(context) == 512
    assert TierConfig(token_budget=512, budget_floor_tokens=8192).budget_tokens(context) == 512
    assert TierConfig(budget_floor_tokens=0).budget_tokens(context) == context // 8
    assert TierConfig(token_budget=0.25, budget_floor_tokens=0).budget_tokens(context) == context // 4
    assert TierConfig(token_budget=0.25, budget_floor_tokens=3000).budget_tokens(context) == max(3000, context // 4)


def test_fraction_without_floor_attends_at_least_one_token():
    assert TierConfig(token_budget=0.125, budget_floor_tokens=0).budget_tokens(3) == 1
