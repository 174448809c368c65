"""Issue 4 record: exact offloaded decode (TieredKVCache, attention="full") on a random-weight model shape.

The context is filled with random K/V written straight into the tiers (no prefill attention: decode speed
does not depend on the values), then N decode steps run eagerly through our forward. Per row: ms/token,
bytes per token over PCIe, achieved GB/s, and an estimate of copy time hidden under compute (against the
same step with the whole cache on the GPU and the copy time at --link-gbps).
Usage: python bench/tiered_decode.py --shape llama3.1-8b --context 32K,128K --gpu-budget 4GiB --out F.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time

import torch

from tierkv.config import TierConfig, parse_size
from tierkv.engine import eager_step
from tierkv.kv.caches.base import KVCache
from tierkv.kv.caches.static import StaticKVCache
from tierkv.kv.caches.eager_sparse import EagerSparseKVCache
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config


def fill(cache: KVCache, cfg, n: int, device, dtype, slice_tokens: int = 4096) -> None:
    """Append n random tokens to every layer (keys and values ~ N(0, 1)) without running attention."""
    g = torch.Generator(device=device).manual_seed(0)
    for start in range(0, n, slice_tokens):
        t = min(slice_tokens, n - start)
        for layer in range(cfg.num_layers):
            kv = torch.randn(2, t, cfg.num_kv_heads, cfg.head_dim, generator=g, device=device, dtype=dtype)
            cache.append(layer, kv[0], kv[1], kv[0])
        cache.advance(t)


def time_steps(model, cache: KVCache, steps: int, warmup: int = 2) -> list[float]:
    """Wall-clock ms of each decode step after warm-up (synchronised)."""
    step = eager_step(model, cache)
    tok = torch.zeros(1, dtype=torch.long, device=model.device)
    out = []
    for i in range(warmup + steps):
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = step(tok, cache.seq_len)
        tok = logits[-1].argmax().view(1)
        if model.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            out.append(1000 * (time.perf_counter() - t0))
    return out


def run_row(model, cfg, context: int, args, **opts) -> dict:
    device, dtype = model.device, model.dtype
    tier = TierConfig(kv_gpu_budget=args.gpu_budget, cpu_budget=opts.pop("cpu_budget", args.cpu_budget),
                      disk_dir=args.disk_dir or tempfile.mkdtemp(prefix="tierkv-bench-"), attention=args.attention,
                      token_budget=args.token_budget)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    shape = (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)
    if args.attention == "sparse":
        cache = EagerSparseKVCache(*shape, device=device, dtype=dtype, config=tier, options=TieredOptions(**opts),
                                   rope=model.rope)
    else:
        cache = TieredKVCache(*shape, device=device, dtype=dtype, config=tier, options=TieredOptions(**opts))
    t0 = time.perf_counter()
    fill(cache, cfg, context, device, dtype)
    fill_s = time.perf_counter() - t0
    ms = time_steps(model, cache, opts.get("steps", args.steps))
    st = cache.stats()
    last = st["last_step"]["bytes_moved"]
    pcie = last.get("host->device", 0) + last.get("disk->device", 0)
    med = statistics.median(ms)
    row = {"context": context, "attention": args.attention, "ms_per_token": med, "ms_all": ms, "fill_s": fill_s,
           "bytes_per_token": {k: v for k, v in last.items() if v}, "pcie_bytes_per_token": pcie,
           "achieved_gbps": pcie / (med / 1000) / 1e9, "host_read": st["host_read"], "disk_backend": st["disk_backend"],
           "disk_threads": st.get("disk_threads"), "disk_parallelism_gbps": st.get("disk_parallelism_gbps"),
           "chunks": st["chunks"], "hit_rate": st["last_step"]["hit_rate"], "sparse": st.get("sparse"),
           "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    cache.close()
    return row


def all_on_gpu_ms(model, cfg, context: int, steps: int) -> float | None:
    """The same eager step with the whole cache on the GPU (None when it does not fit)."""
    try:
        cache = StaticKVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, device=model.device,
                              dtype=model.dtype, capacity=context + steps + 8)
    except torch.OutOfMemoryError:
        return None
    fill(cache, cfg, context, model.device, model.dtype)
    ms = statistics.median(time_steps(model, cache, steps))
    cache.close()
    del cache
    torch.cuda.empty_cache() if model.device.type == "cuda" else None
    return ms


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--context", default="32K,128K")
    ap.add_argument("--gpu-budget", default="4GiB")
    ap.add_argument("--cpu-budget", default=None)
    ap.add_argument("--disk-cpu-budget", default=None, help="also run the largest context with this host budget (rest on disk)")
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--disk-steps", type=int, default=2)
    ap.add_argument("--host-read", default="mapped,copy")
    ap.add_argument("--link-gbps", type=float, default=52.0, help="measured pinned host->device GB/s")
    ap.add_argument("--attention", default="full", choices=["full", "sparse"])
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--no-dense", action="store_true", help="skip the all-on-GPU reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = shape_config(args.shape)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    model = random_model(cfg, args.device, dtype)
    contexts = [int(parse_size(c.replace("K", "KiB").replace("k", "KiB"))) for c in args.context.split(",")]
    rows = []
    for ctx in contexts:
        dense_ms = None if args.no_dense else all_on_gpu_ms(model, cfg, ctx, args.steps)
        for mode in args.host_read.split(","):
            r = run_row(model, cfg, ctx, args, host_read=mode)
            r["all_on_gpu_ms"] = dense_ms
            copy_ms = r["pcie_bytes_per_token"] / (args.link_gbps * 1e9) * 1000
            if dense_ms is not None and copy_ms > 0:
                r["copy_ms_at_link"] = copy_ms
                r["hidden_share_est"] = max(0.0, min(1.0, 1 - max(0.0, r["ms_per_token"] - dense_ms) / copy_ms))
            rows.append(r)
            print(f"ctx {ctx}: {mode:6s} {r['ms_per_token']:.1f} ms/tok, {r['pcie_bytes_per_token'] / 2**30:.2f} GiB/tok "
                  f"over PCIe = {r['achieved_gbps']:.1f} GB/s; all-on-GPU {dense_ms} ms", flush=True)
    if args.disk_cpu_budget:
        for backend in ("kvikio", "posix"):
            try:
                r = run_row(model, cfg, contexts[-1], argparse.Namespace(**{**vars(args), "steps": args.disk_steps}),
                            cpu_budget=args.disk_cpu_budget, disk_backend=backend)
            except Exception as exc:  # a backend that cannot run is reported, not omitted
                r = {"context": contexts[-1], "disk_backend": backend, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(r)
            print(f"ctx {contexts[-1]} with disk ({backend}): {r.get('ms_per_token', r.get('error'))}", flush=True)
    result = {"bench": "tiered_decode", "shape": args.shape, "attention": args.attention, "gpu_budget": args.gpu_budget,
              "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
              "date": datetime.date.today().isoformat(), "command": " ".join(["python", *sys.argv]), "rows": rows}
    line = json.dumps(result)
    if args.out:
        open(args.out, "w").write(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
