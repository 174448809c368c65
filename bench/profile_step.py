"""Where a graph-less decode step spends GPU time: kernel times summed by name under torch.profiler.

Usage: python bench/profile_step.py --shape llama3.1-8b --context 4096
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from tierkv.engine import eager_step, prefill
from tierkv.graph import GraphStep
from tierkv.kv.caches.static import StaticKVCache
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--context", type=int, default=4096)
    args = ap.parse_args()
    cfg = shape_config(args.shape)
    model = random_model(cfg, "cuda", torch.bfloat16)
    cache = StaticKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16,
                          capacity=args.context + 64)
    ids = torch.randint(0, cfg.vocab_size, (args.context,), device="cuda")
    with torch.no_grad():
        logits = prefill(model, ids, cache, 2048)
        tok = logits[-1].argmax().view(1)
        step = eager_step(model, cache)
        for i in range(3):
            step(tok, args.context + i)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(5):
                step(tok, args.context + 3 + i)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
        g = GraphStep(model, cache)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(5):
            g(tok, 0)
        start.record()
        for _ in range(20):
            g(tok, 0)
        end.record()
        torch.cuda.synchronize()
        print(f"graph replay: {start.elapsed_time(end) / 20:.3f} ms/step (events, 20 replays)")


if __name__ == "__main__":
    main()
