"""How often a sparse decode step picks chunks its layer picked the step before, on the real default model.

That share is the hit rate a GPU cache of last step's picks (and a prefetch of them) would get, so it sizes the
next speed step of the graph path. CPU, fp32, SmolLM2, real text (pydoc topics), greedy decode.

    python bench/pick_repeats.py --context 6144 --steps 64 --budget 0.125 --out bench/results/x.json
Ends with one JSON line (machine, date, command).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time

import torch

import tierkv
from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.kv.fast_sparse import FastSparseKVCache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", default="0.125", help="token budget: a fraction < 1 or a token count")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    llm = tierkv.load(device="cpu", dtype="fp32")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:args.context]
    budget = float(args.budget) if "." in args.budget else int(args.budget)
    tier = TierConfig(attention="sparse", token_budget=budget)
    c = llm.cfg
    cache = FastSparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                              config=tier, capacity=len(ids) + args.steps + 1, rope=llm.model.rope,
                              track_repeats=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = prefill(llm.model, torch.tensor(ids), cache, tier.prefill_chunk)
        list(generate_ids(eager_step(llm.model, cache), logits, len(ids), args.steps, set(), GenStats()))
    st = cache.stats()
    out = {"bench": "pick_repeats", "model": "SmolLM2-135M-Instruct", "context": len(ids), "steps": args.steps,
           "token_budget": budget, "max_picks": st["max_picks"], "picks": st["picks"],
           "picks_repeated": st["picks_repeated"], "repeat_rate": st["repeat_rate"],
           "sparse_steps": st["sparse_steps"], "seconds": time.perf_counter() - t0,
           "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python"] + sys.argv)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
