"""The sampler's cost per token and its host syncs on the device: each configuration (greedy, temperature, top-k,
top-p, min-p, repeat penalty, all together) picks tokens from random logits of a real vocabulary size under
torch.cuda.set_sync_debug_mode("error"), so any host sync raises; the median time per pick is recorded.

    python bench/sampler_sync.py --vocab 128256 --steps 200 --out $OUT/sampler_sync.json
Ends with one JSON line (device, date, command).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tierkv.bench.common import emit, run_record
from tierkv.sample import Sampler
from tierkv.sample_config import SamplingConfig

CONFIGS = {
    "greedy": SamplingConfig(),
    "temperature": SamplingConfig(temperature=0.8, seed=1),
    "top_k": SamplingConfig(temperature=0.8, top_k=40, seed=1),
    "top_p": SamplingConfig(temperature=0.8, top_p=0.9, seed=1),
    "min_p": SamplingConfig(temperature=0.8, min_p=0.05, seed=1),
    "repeat_penalty_greedy": SamplingConfig(repeat_penalty=1.1),
    "all": SamplingConfig(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1, seed=1),
}


def measure(cfg: SamplingConfig, logits: torch.Tensor, device: torch.device) -> dict:
    sampler = Sampler(cfg, device, list(range(100)))
    times, picks = [], []
    for row in logits:
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        t0 = time.perf_counter()
        picks.append(sampler(row))
        end = torch.cuda.Event(enable_timing=False)
        end.record()
        torch.cuda.set_sync_debug_mode("default")
        end.synchronize()
        times.append(time.perf_counter() - t0)
    return {"median_us": 1e6 * statistics.median(times), "host_syncs": 0, "distinct_tokens": len({int(p) for p in picks})}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    logits = 3 * torch.randn(args.steps, args.vocab, device=device, generator=gen)
    rows = {name: measure(cfg, logits, device) for name, cfg in CONFIGS.items()}
    for name, row in rows.items():
        print(f"{name:24s} {row['median_us']:8.1f} us/pick  {row['distinct_tokens']} distinct tokens")
    emit({"vocab": args.vocab, "steps": args.steps, "configs": rows, **run_record(device)}, args.out)


if __name__ == "__main__":
    main()
