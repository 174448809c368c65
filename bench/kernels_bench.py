"""Times each kernel's Triton version against its torch reference at Llama-3.1-8B decode shapes (one layer).

Usage: python bench/kernels_bench.py [--out DIR]. Writes kernels-<device>.json to DIR (default $OUT or .)
and ends its output with one JSON line (device, date, command, per-op medians in microseconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from tierkv.kernels import (
    chunk_topk, decode_attention, merge_partials, paged_decode_attention, rebuild_keys, shadow_paged_attention,
)
from tierkv.kernels.dispatch import implementation

HQ, HKV, D, S, R, CHUNK, PICKED = 32, 8, 128, 128 * 1024, 32, 32, 2048
SINK_CHUNKS, WINDOW_CHUNKS = 2, 4
SELECT_CHUNKS = (1024, 4096, 8192)  # select_top_chunks cases: 32K, 128K, 256K tokens of 32


def cases(dev: str):
    """Yields (name, bytes read, fn(impl)) for each op at the benchmark shapes, then (..., (before, after)) for
    ops timed against an older implementation rather than torch."""
    g = torch.Generator(device=dev).manual_seed(0)
    bf = torch.bfloat16

    def rn(*shape, dtype=bf, scale=1.0):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    n_chunks = S // CHUNK
    m = PICKED // CHUNK
    picks = torch.stack([torch.randperm(n_chunks, generator=g, device=dev)[:m] for _ in range(HKV)])  # (Hkv, m)
    tok = (picks.unsqueeze(-1) * CHUNK + torch.arange(CHUNK, device=dev)).reshape(HKV, PICKED)  # (Hkv, n)
    inv = 1.0 / 500000.0 ** (torch.arange(0, D, 2, device=dev, dtype=torch.float32) / D)
    ang = torch.outer(torch.arange(S, device=dev, dtype=torch.float32), inv)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()  # (S, D)
    a_shared, basis = rn(S, R), rn(R, HKV * D, scale=0.2)  # (S, r), (r, Hkv*D)
    yield "rebuild_keys", PICKED * HKV * (R + 2 * D) * 2, lambda i: rebuild_keys(a_shared, basis, tok, cos, sin, impl=i)

    q, k, v = rn(HQ, D), rn(PICKED, HKV, D), rn(PICKED, HKV, D)
    yield "decode_attention", 2 * PICKED * HKV * D * 2, lambda i: decode_attention(q, k, v, impl=i)

    k_pool, v_pool = rn(n_chunks, CHUNK, HKV, D), rn(n_chunks, CHUNK, HKV, D)  # (slots, chunk, Hkv, D)
    sinks = torch.arange(SINK_CHUNKS, device=dev).expand(HKV, -1)
    window = torch.arange(n_chunks - WINDOW_CHUNKS, n_chunks, device=dev).expand(HKV, -1)
    slots = torch.cat((sinks, picks, window), dim=1).contiguous()  # (Hkv, m + sinks + window)
    lengths = torch.full(slots.shape, CHUNK, device=dev, dtype=torch.int32)
    lengths[:, -1] = 7  # the open chunk
    n_all = slots.shape[1] * CHUNK
    yield "paged_decode_attention", 2 * n_all * HKV * D * 2, lambda i: paged_decode_attention(q, k_pool, v_pool, slots, lengths, impl=i)

    chunk_ids = torch.cat((sinks * 0 - 1, picks, window * 0 - 1), dim=1).contiguous()  # exact keys for sinks/window
    n_pick = picks.shape[1] * CHUNK
    yield "shadow_paged_attention", (n_all * 2 - n_pick + n_pick * R // D) * HKV * D * 2, lambda i: shadow_paged_attention(
        q, a_shared, basis, cos, sin, k_pool, v_pool, slots, lengths, chunk_ids, impl=i)

    outs, lses = rn(4, HQ, D, dtype=torch.float32), rn(4, HQ, dtype=torch.float32)
    yield "merge_partials", outs.numel() * 4, lambda i: merge_partials(outs, lses, impl=i)

    q_low = rn(HKV, HQ // HKV, R, dtype=torch.float32)
    n_tok = torch.tensor(S - 5, device=dev)
    end = torch.tensor(n_chunks - WINDOW_CHUNKS, device=dev)
    a_heads = rn(HKV, S, R)  # (Hkv, S, r)
    yield "chunk_topk_shared", S * R * 2, lambda i: chunk_topk(q_low, a_shared, n_tok, end, m, CHUNK, R**-0.5, SINK_CHUNKS, impl=i)
    yield "chunk_topk_per_head", HKV * S * R * 2, lambda i: chunk_topk(q_low, a_heads, n_tok, end, m, CHUNK, R**-0.5, SINK_CHUNKS, impl=i)
    yield from select_cases(dev, g, m)


def select_cases(dev: str, g: torch.Generator, m: int):
    """chunk_topk's tail at 32K, 128K and 256K tokens: the group-reduce kernel + torch.topk ('unfused', before)
    against the two-launch fused select ('fused'). Yields (name, bytes read, fn(impl), impls)."""
    from tierkv.kernels.chunk_topk_triton import group_best_triton, select_top_chunks_triton

    for c in SELECT_CHUNKS:
        red = torch.randn(HKV, HQ // HKV, c, generator=g, device=dev) * 3  # (Hkv, G, C) chunk log-masses
        parts = torch.logsumexp(red.view(HKV, HQ // HKV, -1, 256 // CHUNK), dim=-1)  # the scoring kernel's (Hkv, G, P)
        end = torch.tensor(c - WINDOW_CHUNKS, device=dev)

        def fn(impl, red=red, parts=parts, end=end):
            if impl == "fused":
                return select_top_chunks_triton(red, end, m, SINK_CHUNKS, "mass", parts)
            return torch.topk(group_best_triton(red, end, SINK_CHUNKS, "mass", parts), m, dim=-1)

        yield f"select_top_chunks_C{c}", (red.numel() + parts.numel()) * 4, fn, ("unfused", "fused")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--only", default="", help="time only the ops whose name starts with this (e.g. select_top)")
    args = p.parse_args()
    dev = "cuda"
    results = {}
    for name, nbytes, fn, *impls in cases(dev):
        if not name.startswith(args.only):
            continue
        base, new = impls[0] if impls else ("torch", "triton")
        row = {"bytes_read": nbytes}
        for impl in (base, new):
            call = lambda: fn(impl)  # noqa: E731
            call()
            torch.cuda.synchronize()
            row[f"{impl}_us"] = do_bench(call, warmup=25, rep=200, return_mode="median") * 1e3
            try:
                row[f"{impl}_graph_us"] = do_bench_cudagraph(call, rep=200, return_mode="median") * 1e3
            except Exception as exc:  # recorded, not hidden: some reference ops may not capture
                row[f"{impl}_graph_error"] = repr(exc)[:200]
        row["speedup"] = row[f"{base}_us"] / row[f"{new}_us"]
        if f"{base}_graph_us" in row and f"{new}_graph_us" in row:
            row["graph_speedup"] = row[f"{base}_graph_us"] / row[f"{new}_graph_us"]
        if f"{new}_graph_us" in row:
            row[f"{new}_graph_GBps"] = nbytes / (row[f"{new}_graph_us"] * 1e-6) / 1e9
        results[name] = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
        print(name, results[name], flush=True)
    record = {
        "bench": "kernels", "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv), "torch": torch.__version__, "triton": triton.__version__,
        "impl": implementation(dev), "units": "microseconds, median (do_bench; *_graph_us: do_bench_cudagraph)",
        "shapes": {"Hq": HQ, "Hkv": HKV, "D": D, "S": S, "rank": R, "chunk": CHUNK, "picked_tokens": PICKED,
                   "sink_chunks": SINK_CHUNKS, "window_chunks": WINDOW_CHUNKS, "dtype": "bf16",
                   "select_chunks": SELECT_CHUNKS},
        "results": results,
    }
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "kernels-h100.json"), "w") as f:
        json.dump(record, f, indent=1)
    print(json.dumps(record))


if __name__ == "__main__":
    main()
