"""Where the tiered caches' prefill spends its time: a Python profile (cumulative) of one prompt and two decode
steps through `LLM.stream_ids` with a small KV GPU budget, so the tiered (exact or eager sparse) cache runs.

Usage: python bench/profile_prefill.py --shape llama-tiny --context 16K --attention sparse [--device cuda]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import pstats
import time

import tierkv
from tierkv.bench.common import parse_contexts, run_record
from tierkv.bench.systems import random_ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama-tiny")
    ap.add_argument("--context", default="16K")
    ap.add_argument("--attention", default="sparse", choices=("full", "sparse"))
    ap.add_argument("--kv-gpu-budget", default="64MiB")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    n = parse_contexts(a.context)[0]
    llm = tierkv.load(a.shape, device=a.device, attention=a.attention, kv_gpu_budget=a.kv_gpu_budget,
                      token_budget=512, graph=False)
    llm.cfg = dataclasses.replace(llm.cfg, max_position_embeddings=n + 64)  # random weights: any length
    llm.stop_ids = set()
    ids = random_ids(n, llm.cfg.vocab_size, 0)
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    list(llm.stream_ids(ids, max_new_tokens=3))
    prof.disable()
    print(f"{a.shape} {a.attention} {n} tokens: {time.perf_counter() - t0:.2f} s, "
          f"prefill {llm.stats['prefill_tok_s']:.0f} tok/s; {run_record(llm.device)}")
    pstats.Stats(prof).sort_stats("cumulative").print_stats(a.top)


if __name__ == "__main__":
    main()
