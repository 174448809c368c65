"""Decode rates leave out the first decode step, which alone captures the CUDA graph and compiles kernels."""

from __future__ import annotations

import time

import pytest
import torch

from tierkv.engine import GenStats, generate_ids


def test_rates_leave_out_the_first_step():
    s = GenStats(new_tokens=5, decode_s=1.0, first_step_s=0.61)  # 4 steps: the first 0.61 s, then 3 in 0.39 s
    assert s.decode_ms_per_token == pytest.approx(130.0)
    assert s.decode_tok_s == pytest.approx(3 / 0.39)


def test_a_single_step_is_its_own_rate():
    s = GenStats(new_tokens=2, decode_s=0.25, first_step_s=0.25)
    assert s.decode_ms_per_token == pytest.approx(250.0) and s.decode_tok_s == pytest.approx(4.0)
    assert GenStats(new_tokens=1).decode_ms_per_token == 0.0


def test_generate_times_the_first_step_apart():
    calls = []

    def step(token: torch.Tensor, position: int) -> torch.Tensor:
        calls.append(position)
        time.sleep(0.3 if len(calls) == 1 else 0.01)  # the first step is slow, as a capture is
        return torch.tensor([[0.0, 1.0]])

    stats = GenStats()
    assert list(generate_ids(step, torch.tensor([[1.0, 0.0]]), 7, 6, set(), stats)) == [0, 1, 1, 1, 1, 1]
    assert calls == [7, 8, 9, 10, 11]
    assert 0.3 <= stats.first_step_s < stats.decode_s
    assert stats.decode_ms_per_token < 100  # the slow first step is not spread over the others
