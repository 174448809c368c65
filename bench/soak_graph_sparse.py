"""GPU soak of the graph sparse path with the disk tier (issue 19): 2,000 decode steps at 32K on the Llama-3.1-8B
shape, host RSS and torch.cuda memory sampled every 100 steps. Memory must not grow after the first samples.

    python bench/soak_graph_sparse.py --out bench/results/soak-graph-sparse-llama8b-32k-h200-DATE.json
Writes one line per sample to stderr and the whole record to --out; ends with one JSON line (device, date, command,
growth of host RSS and CUDA allocated/reserved bytes from the first sample to the last, files left in disk_dir).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

import tierkv
from tierkv.bench.common import emit, run_record


def sample(step: int, t0: float, disk_dir: Path) -> dict:
    return {"step": step, "seconds": round(time.perf_counter() - t0, 3),
            "host_rss": psutil.Process().memory_info().rss,
            "cuda_allocated": torch.cuda.memory_allocated(), "cuda_reserved": torch.cuda.memory_reserved(),
            "disk_bytes": sum(f.stat().st_size for f in disk_dir.rglob("*") if f.is_file())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--kv-gpu-budget", default="24GiB")
    ap.add_argument("--cpu-budget", default="2GiB", help="below the context's K/V (128 KiB/token on 8B): disk is used")
    ap.add_argument("--disk-dir", default=None, help="default: a fresh temp directory")
    ap.add_argument("--token-budget", type=int, default=2048,
                    help="tokens attended per step: the disk tier needs a budget whose host slots fit below the pool")
    ap.add_argument("--max-seconds", type=float, default=None,
                    help="stop decoding after this long (the record says how many steps ran): device calls are "
                         "time-boxed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    disk_dir = Path(args.disk_dir or tempfile.mkdtemp(prefix="tierkv-soak-"))
    llm = tierkv.load(args.model, attention="sparse", token_budget=args.token_budget,
                      kv_gpu_budget=args.kv_gpu_budget, cpu_budget=args.cpu_budget,
                      disk_dir=str(disk_dir))
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, llm.cfg.vocab_size, (args.context,), generator=g).tolist()
    samples, t0, stopped_early = [], time.perf_counter(), False
    stream = llm.stream_ids(ids, max_new_tokens=args.steps)
    for step, _ in enumerate(stream, start=1):
        if step % args.every == 0:
            samples.append(sample(step, t0, disk_dir))
            print(samples[-1], file=sys.stderr, flush=True)
            if args.max_seconds is not None and time.perf_counter() - t0 > args.max_seconds and step < args.steps:
                stopped_early = True
                stream.close()  # ends the call the way a user's break does: the cache is released
                break
    kv = llm.stats.get("kv", {})
    llm.close()
    torch.cuda.synchronize()
    left = sorted(str(p.relative_to(disk_dir)) for p in disk_dir.rglob("*"))
    first, last = samples[0], samples[-1]
    growth = {k: last[k] - first[k] for k in ("host_rss", "cuda_allocated", "cuda_reserved")}
    # the steady state: the second half only (the first samples may still fill host slots for disk chunks)
    mid = samples[len(samples) // 2]
    growth_second_half = {k: last[k] - mid[k] for k in ("host_rss", "cuda_allocated", "cuda_reserved")}
    record = {"model": args.model, "context": args.context, "steps": len(samples) * args.every,
              "steps_asked": args.steps,
              "stopped_early_at_max_seconds": stopped_early,
              "kv_gpu_budget": args.kv_gpu_budget, "cpu_budget": args.cpu_budget, "disk_dir": str(disk_dir),
              "decode_ms_per_token": llm.stats.get("decode_ms_per_token"),
              # the tiered cache names its backend at the top; the sparse cache in its disk tier's stats
              "kv_disk_backend": kv.get("disk_backend") or (kv.get("disk_tier") or {}).get("backend"),
              "kv_disk_tier": kv.get("disk_tier"),
              "growth_bytes": growth, "growth_bytes_second_half": growth_second_half,
              "files_left_after_close": left, "after_close_cuda_allocated": torch.cuda.memory_allocated(),
              "samples": samples, **run_record(torch.device("cuda"))}
    emit(record, args.out)


if __name__ == "__main__":
    main()
