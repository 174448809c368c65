"""Soak: 2,000 exact decode steps on the llama-tiny shape with tier budgets so small that every sealed chunk pushes
one down (device -> host -> disk) and every step streams the disk and host chunks back to the device.

The tokens equal the all-on-device run's, and after close() nothing is held: no tier bytes, no device or host
buffers, no files. Exact attention reads every chunk in place each step, so no chunk is promoted back up (only the
sparse cache promotes); what this soak drives constantly is demotion and streaming reads from all three tiers.
"""

import time

import pytest
import torch

import tierkv
from tierkv.engine import GenStats, eager_step, generate_ids, prefill

PROMPT = [(7 * i) % 500 for i in range(64)]
STEPS = 2000
CB = 8192  # llama-tiny chunk bytes at chunk_size 32, fp32


def decode(llm, steps: int, sample_every: int = 0):
    """Prefill PROMPT and decode `steps` tokens greedily; returns (tokens, cache, stats sampled along the way)."""
    cache = llm.new_cache(len(PROMPT) + steps + 1)
    logits = prefill(llm.model, torch.tensor(PROMPT), cache, 2048)
    toks, samples = [], []
    for t in generate_ids(eager_step(llm.model, cache), logits, len(PROMPT), steps, set(), GenStats()):
        toks.append(t)
        if sample_every and len(toks) % sample_every == 0:
            samples.append(cache.stats())
    return toks, cache, samples


@pytest.mark.slow
def test_two_thousand_steps_across_three_tiers_match_and_leave_nothing(tmp_path, one_thread):
    t0 = time.perf_counter()
    want, dense, _ = decode(tierkv.load("llama-tiny", device="cpu"), STEPS)
    dense.close()
    llm = tierkv.load("llama-tiny", device="cpu", chunk_size=32, kv_gpu_budget=12 * CB, cpu_budget=8 * CB, disk_dir=str(tmp_path),
                      sink_tokens=32, window_tokens=32)
    got, cache, samples = decode(llm, STEPS, sample_every=500)
    assert got == want
    for early, late in zip(samples, samples[1:]):  # every stretch of 500 steps moved bytes on every path
        for pair in ("device->host", "host->disk", "disk->device", "host->device"):
            assert late["total"]["bytes_moved"][pair] > early["total"]["bytes_moved"][pair], pair
    s = cache.stats()
    assert s["chunks"]["device"] == 8 and s["chunks"]["host"] == 8 and s["chunks"]["disk"] > 100
    assert s["disk_file_bytes"] > 0 and s["host_reserved_bytes"] > 0 and s["gpu_reserved_bytes"] > 0
    cache.close()
    s = cache.stats()
    assert s["bytes"] == {"device": 0, "host": 0, "disk": 0} and sum(s["chunks"].values()) == 0
    assert s["disk_file_bytes"] == 0 and s["host_reserved_bytes"] == 0 and s["gpu_reserved_bytes"] == 0
    assert list(tmp_path.iterdir()) == []  # the run directory and its file are gone
    llm.close()
    print(f"soak: {STEPS} steps, {time.perf_counter() - t0:.1f} s")
