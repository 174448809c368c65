"""LLM.generate/stream on a random-weight shape: options validated, stop strings, the context cap (ctx_size)."""

from __future__ import annotations

import pytest

import tierkv
from tierkv.errors import ConfigError, ContextTooLongError


@pytest.fixture(scope="module")
def tiny():
    return tierkv.load("llama-tiny", device="cpu", ctx_size=64)


@pytest.mark.parametrize("options, fragment", [
    ({"max_new_tokens": -1}, "max_new_tokens=-1"), ({"max_new_tokens": 0}, "max_new_tokens=0"),
    ({"temperature": -1.0}, "temperature=-1.0"), ({"temperature": 0.7, "top_p": 0.0}, "top_p=0.0"),
    ({"top_q": 0.5}, "unknown generation option top_q"),
])
def test_bad_options_are_refused_before_any_work(tiny, options, fragment):
    with pytest.raises(ConfigError, match=fragment):
        tiny.generate("hello", **options)
    with pytest.raises(ConfigError, match=fragment):
        list(tiny.stream("hello", **options))


@pytest.mark.parametrize("prompt", ["", "  \n\t"])
def test_empty_prompt_is_refused(tiny, prompt):
    with pytest.raises(ConfigError, match="the prompt is empty"):
        tiny.generate(prompt)


def test_stop_string_ends_generation_and_is_not_returned(tiny):
    full = tiny.generate("hello", max_new_tokens=12)
    assert tiny.stats["stop_reason"] == "max_new_tokens" and tiny.stats["new_tokens"] == 12
    stop = next(full[i:i + 2] for i in range(2, len(full) - 2) if "\ufffd" not in full[i:i + 2])
    cut = tiny.generate("hello", max_new_tokens=12, stop=[stop])
    assert cut == full[:full.index(stop)]
    assert tiny.stats["stop_reason"] == "stop_string" and tiny.stats["new_tokens"] < 12


def test_ctx_size_caps_the_context(tiny):
    assert tiny.context_size == 64
    out = list(tiny.stream_ids(list(range(60)), max_new_tokens=10))
    assert len(out) == 4 and tiny.stats["stop_reason"] == "context_full"
    with pytest.raises(ContextTooLongError, match="prompt has 64 tokens but the context is 64"):
        list(tiny.stream_ids(list(range(64))))


def test_ctx_size_above_the_model_context_is_refused():
    with pytest.raises(ConfigError, match="ctx_size=2000000 .* above the model.s context of 1048576"):
        tierkv.load("llama-tiny", device="cpu", ctx_size=2_000_000)


def test_greedy_with_top_k_1_and_sampling_filters_equal_greedy(tiny):
    greedy = tiny.generate("hello", max_new_tokens=8)
    assert tiny.generate("hello", max_new_tokens=8, temperature=1.3, top_k=1, seed=3) == greedy
    assert tiny.generate("hello", max_new_tokens=8, temperature=1.3, min_p=1.0, seed=3) == greedy


def test_malformed_ctx_size_is_refused():
    with pytest.raises(ConfigError, match="ctx_size=1 .* integer >= 2"):
        tierkv.load("llama-tiny", device="cpu", ctx_size=1)


def test_warm_up_leaves_nothing_behind_and_changes_no_tokens():
    prompt = "the warm-up must not change what a later call returns " * 30
    cold = tierkv.load("llama-tiny", device="cpu", dtype="fp32", attention="sparse")
    want = cold.generate(prompt, max_new_tokens=12)
    warm = tierkv.load("llama-tiny", device="cpu", dtype="fp32", attention="sparse")
    assert warm.warm_up(tokens=1024) > 0
    assert warm.kept("generate") == (None, None) and warm.stats["new_tokens"] == 0
    assert warm.generate(prompt, max_new_tokens=12) == want
