"""How often a sparse decode step picks chunks its layer picked the step before, and the hit rate of the GPU
chunk cache that keeps earlier picks, on the real default model (SmolLM2, real text: pydoc topics, greedy).

A repeated pick is what a prefetch of last step's picks would have predicted right; the chunk cache holds at
least those, so its hit rate is at least the repeat rate. On CUDA the decode replays a CUDA graph.

    python bench/pick_repeats.py --context 6144 --steps 64 --budget 0.125 --out bench/results/x.json
    python bench/pick_repeats.py --device cuda --dtype bf16
Ends with one JSON line (machine, date, command).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

import tierkv
from tierkv.bench.common import emit, run_record
from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.graph import GraphStep
from tierkv.kv.caches.sparse import SparseKVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", default="0.125", help="token budget: a fraction < 1 or a token count")
    ap.add_argument("--budget-floor-tokens", type=int, default=0,
                    help="a fractional --budget attends at least this many tokens (default 0: the fraction alone, as "
                         "the recorded runs; tierkv's default is 2048)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    llm = tierkv.load(device=args.device, dtype=args.dtype)
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:args.context]
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    tier = TierConfig(attention="sparse", token_budget=budget, budget_floor_tokens=args.budget_floor_tokens)
    c = llm.cfg
    cache = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=llm.device, dtype=llm.dtype,
                          config=tier, capacity=len(ids) + args.steps + 1, rope=llm.model.rope,
                          track_repeats=True, chunk_cache=True)
    t0 = time.perf_counter()
    stats = GenStats()
    with torch.no_grad():
        logits = prefill(llm.model, torch.tensor(ids, device=llm.device), cache, tier.prefill_chunk)
        step = GraphStep(llm.model, cache) if llm.device.type == "cuda" else eager_step(llm.model, cache)
        list(generate_ids(step, logits, len(ids), args.steps, set(), stats))
    st = cache.stats()
    out = {"bench": "pick_repeats", "model": "SmolLM2-135M-Instruct", "context": len(ids), "steps": args.steps,
           "token_budget": budget, "budget_floor_tokens": tier.budget_floor_tokens,
           "budget_tokens": tier.budget_tokens(len(ids)), "max_picks": st["max_picks"], "picks": st["picks"],
           "picks_repeated": st["picks_repeated"], "repeat_rate": st["repeat_rate"],
           "chunk_cache": st["chunk_cache"], "host_link_bytes": st["total"]["bytes_moved"]["host->device"],
           "sparse_steps": st["sparse_steps"], "seconds": time.perf_counter() - t0,
           "decode_ms_per_token": 1000 * stats.decode_s / max(1, stats.new_tokens - 1), "dtype": args.dtype,
           "threads": torch.get_num_threads(), "python": platform.python_version(), **run_record(llm.device)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
