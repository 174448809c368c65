"""Prefill throughput of our forward on a full-size shape (random weights, all-on-GPU cache).

    python bench/prefill_speed.py --shape llama3.1-8b --context 8K,32K
Ends with one JSON line (device, date, command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tierkv.config import parse_size
from tierkv.engine import prefill
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--context", default="8K,32K")
    ap.add_argument("--chunk", type=int, default=2048)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = shape_config(args.shape)
    model = random_model(cfg, dev, torch.bfloat16)
    rows = []
    for ctx in [parse_size(x.replace("K", "KiB")) for x in args.context.split(",")]:
        cache = DenseKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, device=dev, dtype=torch.bfloat16,
                             capacity=ctx)
        ids = torch.randint(0, cfg.vocab_size, (ctx,), device=dev)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        prefill(model, ids, cache, args.chunk)
        torch.cuda.synchronize()
        s = time.perf_counter() - t0
        rows.append({"context": ctx, "seconds": s, "tok_s": ctx / s})
        print(json.dumps(rows[-1]), flush=True)
        cache.close()
    print(json.dumps({"bench": "prefill_speed", "device": torch.cuda.get_device_name(dev),
                      "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv), "rows": rows}))


if __name__ == "__main__":
    main()
