"""tierkv.sample and tierkv.sample_config: each filter of the sampler, the repeat penalty, greedy, validation."""

from __future__ import annotations

import math

import pytest
import torch

from tierkv.errors import ConfigError
from tierkv.sample import Sampler, penalize_repeats, sample, sampling_probs
from tierkv.sample_config import SamplingConfig

PROBS = torch.tensor([0.5, 0.3, 0.15, 0.05])
LOGITS = PROBS.log()  # at temperature 1 the sampler's distribution starts as PROBS


def _draws(cfg: SamplingConfig, n: int = 400) -> list[int]:
    g = torch.Generator().manual_seed(0)
    return [int(sample(LOGITS, cfg, g)) for _ in range(n)]


def test_top_p_keeps_only_the_nucleus():
    # 0.5 + 0.3 reaches 0.7, so tokens 2 and 3 go and the rest is renormalised
    probs = sampling_probs(LOGITS, SamplingConfig(temperature=1.0, top_p=0.7))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))
    assert set(_draws(SamplingConfig(temperature=1.0, top_p=0.7))) == {0, 1}
    assert set(_draws(SamplingConfig(temperature=1.0))) == {0, 1, 2, 3}  # the same seed without top-p


def test_top_k_keeps_the_k_most_likely():
    probs = sampling_probs(LOGITS, SamplingConfig(temperature=1.0, top_k=2))
    torch.testing.assert_close(probs, torch.tensor([0.625, 0.375, 0.0, 0.0]))


def test_top_k_1_equals_greedy():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, 1000, generator=g)
    cfg = SamplingConfig(temperature=1.5, top_k=1)
    picks = torch.stack([sample(row, cfg, g) for row in logits])
    assert torch.equal(picks, logits.argmax(-1))


def test_min_p_keeps_only_tokens_above_the_threshold():
    # threshold 0.2 x 0.5 = 0.1: 0.05 goes
    probs = sampling_probs(LOGITS, SamplingConfig(temperature=1.0, min_p=0.2))
    torch.testing.assert_close(probs, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)
    assert set(_draws(SamplingConfig(temperature=1.0, min_p=0.2))) == {0, 1, 2}


def test_temperature_sharpens_the_distribution():
    probs = sampling_probs(LOGITS, SamplingConfig(temperature=0.5))
    torch.testing.assert_close(probs, PROBS**2 / (PROBS**2).sum())


def test_repeat_penalty_lowers_repeated_logits_by_the_factor():
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    out = penalize_repeats(logits, torch.tensor([0, 1, 1]), 2.0)
    assert out.tolist() == [1.0, -2.0, 3.0, 0.5]  # positive divided, negative multiplied, others unchanged
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5]


def test_repeat_penalty_covers_the_prompt_and_each_new_token():
    logits = torch.tensor([3.0, 2.9, 0.0, 0.0])
    plain = Sampler(SamplingConfig(), torch.device("cpu"), [2])
    assert [int(plain(logits)) for _ in range(3)] == [0, 0, 0]
    penalised = Sampler(SamplingConfig(repeat_penalty=2.0), torch.device("cpu"), [2])
    # 0 wins; then 0 is at 1.5 and 1 wins; then both are penalised and 0 (1.5) beats 1 (1.45)
    assert [int(penalised(logits)) for _ in range(3)] == [0, 1, 0]
    from_prompt = Sampler(SamplingConfig(repeat_penalty=2.0), torch.device("cpu"), [0])
    assert int(from_prompt(logits)) == 1


def test_repeat_window_forgets_old_tokens():
    logits = torch.tensor([3.0, 2.9, 0.0, 0.0])
    s = Sampler(SamplingConfig(repeat_penalty=2.0, repeat_window=2), torch.device("cpu"), [0, 2, 3])
    assert int(s(logits)) == 0  # 0 is older than the last two prompt tokens


def test_greedy_is_argmax():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(1000, generator=g)
    assert int(sample(logits, SamplingConfig())) == int(logits.argmax())
    assert Sampler(SamplingConfig(), torch.device("cpu")).generator is None


def test_seeded_sampling_repeats():
    cfg = SamplingConfig(temperature=1.0, seed=5)
    a = [int(Sampler(cfg, torch.device("cpu"))(LOGITS)) for _ in range(20)]
    b = [int(Sampler(cfg, torch.device("cpu"))(LOGITS)) for _ in range(20)]
    assert a == b


@pytest.mark.parametrize("field, value", [
    ("max_new_tokens", -1), ("max_new_tokens", 0), ("max_new_tokens", 2.5), ("temperature", -1.0),
    ("temperature", math.nan), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", -0.1), ("min_p", 2.0),
    ("repeat_penalty", 0.0), ("repeat_window", 0), ("stop", ("",)), ("stop", (3,)), ("seed", -1),
])
def test_bad_settings_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"^{field}=") as info:
        SamplingConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_updated_refuses_unknown_names_and_normalises_stop():
    cfg = SamplingConfig().updated(stop="END", top_k=5)
    assert cfg.stop == ("END",) and cfg.top_k == 5
    with pytest.raises(ConfigError, match="unknown generation option top_q"):
        cfg.updated(top_q=0.5)
