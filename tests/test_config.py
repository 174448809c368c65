"""TierConfig: sizes parsed, every bad field refused with a one-line ConfigError naming it."""

import pytest

from tierkv.config import TierConfig
from tierkv.errors import ConfigError


def test_sizes_and_defaults():
    cfg = TierConfig(kv_gpu_budget="512MiB", cpu_budget="1.5GB")
    assert (cfg.kv_gpu_budget, cfg.cpu_budget) == (512 * 1024**2, 1_500_000_000)
    assert cfg.gpu_chunk_cache is False and cfg.replace(gpu_chunk_cache=True).gpu_chunk_cache is True


@pytest.mark.parametrize("field,value", [("rank", 0), ("score_rank", 0), ("chunk_size", -1), ("attention", "dense"),
                                         ("sink_tokens", -1), ("token_budget", 1.5), ("gpu_chunk_cache", 1)])
def test_bad_fields_are_named(field, value):
    with pytest.raises(ConfigError, match=field):
        TierConfig(**{field: value})
