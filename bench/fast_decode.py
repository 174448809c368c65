"""Sparse decode (SparseKVCache, one CUDA graph per token) on a full-size model shape, with a profile.

    python bench/fast_decode.py --shape llama3.1-8b --context 32K,128K --token-budget 2048 --out fast.json

Random weights. The context is written straight into the cache (no prefill compute, to save device time):
pre-RoPE keys are a random rank-16 signal plus 5% noise (real keys compress: on SmolLM2 no chunk was an
outlier, while a random-weight model's keys would not), RoPE'd at their positions; values are random. Decode
then runs the real model. Reports graph and eager (uncaptured) ms/token, tokens equal between the two from
the same state, peak GPU memory, modelled bytes over the link and a kernel-time profile by stage.
The KV GPU budget is `--gpu-budget - weights - --reserve` (as `tierkv bench decode` sets it): what the shadows
and the score index leave of it holds values of the first chunks on the GPU (picks there cross no link).
Ends with one JSON line (device, date, command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from tierkv.bench.stages import stage_times
from tierkv.config import TierConfig, format_size, parse_size
from tierkv.graph import GraphStep
from tierkv.kernels.rope import rope_torch
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.sparse.options import SparseOptions
from tierkv.models.build import random_model
from tierkv.models.shapes import shape_config


def fill(cache: SparseKVCache, model, n: int, seed: int, slice_tokens: int = 2048) -> float:
    """Write n synthetic tokens into every layer (see the module docstring). Returns seconds."""
    t0 = time.perf_counter()
    c, dev = model.cfg, model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    mix = [torch.randn(16, c.num_kv_heads * c.head_dim, device=dev, generator=gen) for _ in range(c.num_layers)]
    model.rope.ensure(cache.capacity + 1)
    for s in range(0, n, slice_tokens):
        t = min(slice_tokens, n - s)
        pos = torch.arange(s, s + t, device=dev)
        for layer in range(c.num_layers):
            lat = torch.randn(t, 16, device=dev, generator=gen)
            k_pre = (lat @ mix[layer] + 0.05 * torch.randn(t, mix[layer].shape[1], device=dev, generator=gen))
            k_pre = k_pre.view(t, c.num_kv_heads, c.head_dim)
            k = rope_torch(k_pre, model.rope.cos, model.rope.sin, pos).to(model.dtype)
            v = torch.randn(t, c.num_kv_heads, c.head_dim, device=dev, generator=gen).to(model.dtype)
            cache.append(layer, k, v, k_pre.to(model.dtype))
        cache.advance(t)
    torch.cuda.synchronize(dev)
    return time.perf_counter() - t0


def timed(fn, n: int, dev) -> list[float]:
    out = []
    for _ in range(n):
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(dev)
        out.append(1000 * (time.perf_counter() - t0))
    return out


def profile(fn, n: int) -> dict:
    """CUDA kernel time per step by stage (tierkv.bench.stages), ms."""
    from torch.profiler import ProfilerActivity, profile as prof

    with prof(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    return stage_times(p.key_averages(), n)


def run_context(model, ctx: int, args, weights_bytes: int) -> dict:
    dev = model.device
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
    kv_gpu = parse_size(args.gpu_budget) - weights_bytes - parse_size(args.reserve)
    tier = TierConfig(attention="sparse", token_budget=args.token_budget, rank=args.rank, chunk_size=args.chunk_size,
                      kv_gpu_budget=kv_gpu)
    steps = args.steps + args.eager_steps + 16
    c = model.cfg
    cache = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=dev, dtype=model.dtype, config=tier,
                          capacity=ctx + steps, rope=model.rope, chunk_cache=args.chunk_cache,
                          sparse=SparseOptions(score_rank=args.score_rank))
    fill_s = fill(cache, model, ctx, args.seed)
    step = GraphStep(model, cache)
    tok = torch.zeros(1, dtype=torch.long, device=dev)

    def one(s=step):
        tok.copy_(s(tok, cache.seq_len).argmax(-1).view(1))

    t0 = time.perf_counter()
    one()  # fits shadows and index: eager
    torch.cuda.synchronize(dev)
    fit_s = time.perf_counter() - t0
    eager = timed(lambda: tok.copy_(model.forward(tok, cache.pos, cache).argmax(-1).view(1)), args.eager_steps, dev)
    # graph vs eager from the same state: the eager cache state advances by one step either way
    seq, pos, prev = cache.seq_len, cache.pos.clone(), tok.clone()
    eager_tok = model.forward(prev, cache.pos, cache).argmax(-1).view(1).clone()
    cache.seq_len = seq  # roll back one step: the graph redoes it (rewriting the same slot)
    cache.pos.copy_(pos)
    graph_tok = step(prev, cache.seq_len).argmax(-1).view(1).clone()
    same = bool(torch.equal(eager_tok, graph_tok))
    before = cache.stats()["total"]
    graph = timed(one, args.steps, dev)
    after = cache.stats()["total"]
    peak = torch.cuda.max_memory_allocated(dev)
    prof_graph = profile(one, 4) if args.profile else None
    prof_eager = profile(lambda: tok.copy_(model.forward(tok, cache.pos, cache).argmax(-1).view(1)), 2) \
        if args.profile else None
    st = cache.stats()
    # link bytes per token (modelled from the plan): V of every attended chunk per KV head, K of exact ones
    chunk_head = tier.chunk_size * c.head_dim * model.dtype.itemsize
    fixed = cache.sink_chunks + cache.window_chunks + 1
    picks = min(cache.max_picks, (args.token_budget - fixed * tier.chunk_size) // tier.chunk_size + 1)
    link = c.num_layers * c.num_kv_heads * chunk_head * ((fixed + picks) + fixed)
    med = sorted(graph)[len(graph) // 2]
    # the cache counts what its kernels read from host memory during the timed steps
    measured = {"link_bytes_per_token_measured": (after["bytes_moved"]["host->device"]
                                                  - before["bytes_moved"]["host->device"]) / args.steps}
    hits = {k: after["hits"][k] - before["hits"][k] for k in after["hits"]}
    for where in ("gpu_chunk_cache", "gpu_resident"):
        measured[f"{where}_hit_rate"] = hits[where] / max(1, sum(hits.values()))
    # floor: weights over HBM, the K/V bytes read over the link at its rate, the rest of the K/V read from HBM
    host = min(link, measured["link_bytes_per_token_measured"])
    floor = 1000 * ((weights_bytes + link - host) / args.hbm_gbps / 1e9 + host / args.link_gbps / 1e9)
    cache.close()
    return {"context": ctx, "graph_ms": {"min": min(graph), "median": med, "max": max(graph)},
            "eager_ms_median": sorted(eager)[len(eager) // 2], "graph_equals_eager_next_token": same,
            "peak_gpu_bytes": peak, "peak_gpu": format_size(peak),
            "within_gpu_budget": peak <= parse_size(args.gpu_budget), "kv_gpu_budget": kv_gpu,
            "fill_s": fill_s, "fit_s": fit_s, "link_bytes_per_token_modelled": link,
            **measured, "floor_ms": floor, "measured_over_floor": med / floor, "cache": st,
            "profile_graph_ms": prof_graph, "profile_eager_ms": prof_eager}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--context", default="32K,128K")
    ap.add_argument("--token-budget", type=int, default=2048)
    ap.add_argument("--rank", type=int, default=TierConfig.rank)
    ap.add_argument("--chunk-size", type=int, default=32)
    ap.add_argument("--score-rank", type=int, default=TierConfig.score_rank)
    ap.add_argument("--gpu-budget", default="24GiB", help="the card's budget: weights + KV + activations")
    ap.add_argument("--reserve", default="4GiB", help="kept free of KV for activations (as bench decode)")
    ap.add_argument("--chunk-cache", action=argparse.BooleanOptionalAction, default=False,
                    help="keep earlier picks in a GPU chunk cache (default off: see README)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--eager-steps", type=int, default=4)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--hbm-gbps", type=float, default=2500.0, help="measured decode GEMV weight stream")
    ap.add_argument("--link-gbps", type=float, default=52.0, help="measured pinned host->device")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    cfg = shape_config(args.shape)
    model = random_model(cfg, dev, torch.bfloat16, seed=args.seed)
    weights = sum(t.numel() * t.element_size() for t in [model.embed_tokens, model.lm_head, model.norm]) + sum(
        t.numel() * t.element_size() for w in model.layers for t in vars(w).values() if isinstance(t, torch.Tensor))
    rows = []
    for ctx in [parse_size(x.replace("K", "KiB").replace("M", "MiB")) for x in args.context.split(",")]:
        try:
            rows.append(run_context(model, ctx, args, weights))
        except torch.cuda.OutOfMemoryError as e:
            rows.append({"context": ctx, "status": "oom", "reason": str(e).splitlines()[0][:200]})
        print(json.dumps(rows[-1], default=str), flush=True)
    out = {"bench": "fast_decode", "device": torch.cuda.get_device_name(dev), "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(["python"] + sys.argv), "shape": args.shape, "token_budget": args.token_budget,
           "chunk_size": args.chunk_size, "rank": args.rank, "score_rank": args.score_rank,
           "chunk_cache": args.chunk_cache, "gpu_budget": args.gpu_budget, "reserve": args.reserve,
           "weights_bytes": weights, "torch": torch.__version__, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    print(json.dumps(out, default=str))


if __name__ == "__main__":
    main()
