"""Where a sparse `llm.stream_ids` call spends its time, by stage: prefill (projections, K/V writes, exact
attention over earlier spans, MLP), the shadow/index fit, the disk spill, graph capture and the first steps.

Each timed stage is wrapped with CUDA syncs on both sides, so stages do not overlap while profiled (the total is
a little above an unprofiled run's, which is reported beside it). Also reports the wall time from the call to
each of the first tokens.

Usage (H200/H100): python bench/profile_sparse_prefill.py --shape llama3.1-8b --contexts 32768,131072 \
    --kv-gpu-budget 5GiB --out $OUT/profile.json
CPU smoke: python bench/profile_sparse_prefill.py --shape llama-tiny --contexts 4096 --device cpu
Ends with one JSON line (device, date, command, the numbers).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict

import torch

import tierkv
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.models.llama import LlamaModel

STAGES = {  # (class, method) -> stage name; nested stages are subtracted from their parents below
    (LlamaModel, "_attention"): "attention (all)",
    (LlamaModel, "_mlp"): "mlp",
    (SparseKVCache, "append"): "kv append",
    (SparseKVCache, "_attend_exact"): "exact attention",
    (SparseKVCache, "_attend_sparse"): "sparse attention",
    (SparseKVCache, "_fit"): "shadow+index fit",
    (SparseKVCache, "_spill_to_disk"): "disk spill",
}


def instrument(device: torch.device, times: dict, counts: dict) -> None:
    """Wrap each stage method with synced wall timers (profiling only; behaviour is unchanged)."""
    def sync():
        if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
            torch.cuda.synchronize(device)

    for (cls, name), label in STAGES.items():
        fn = getattr(cls, name)

        @functools.wraps(fn)
        def timed(*a, __fn=fn, __label=label, **k):
            sync()
            t0 = time.perf_counter()
            try:
                return __fn(*a, **k)
            finally:
                sync()
                times[__label] += time.perf_counter() - t0
                counts[__label] += 1

        setattr(cls, name, timed)


def token_times(llm, ids, new: int) -> dict:
    """Wall seconds from the call to each yielded token, and the call's own prefill time."""
    t0 = time.perf_counter()
    stamps = []
    for _ in llm.stream_ids(ids, max_new_tokens=new):
        stamps.append(time.perf_counter() - t0)
    s = llm.stats
    return {"stats": {k: s[k] for k in (
        "prompt_tokens", "new_tokens", "prefill_tok_s", "decode_ms_per_token")}, "token_s": stamps,
        "prefill_end_s": s["prompt_tokens"] / s["prefill_tok_s"] if s["prefill_tok_s"] else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--kv-gpu-budget", default="5GiB")
    ap.add_argument("--token-budget", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    tier = {"attention": "sparse", "kv_gpu_budget": args.kv_gpu_budget}
    if args.token_budget:
        tb = float(args.token_budget)
        tier["token_budget"] = int(tb) if tb >= 1 else tb
    llm = tierkv.load(args.shape, device=args.device, **tier)
    dev = llm.device
    out = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "tier": tier, "runs": []}
    gen = torch.Generator().manual_seed(0)
    times, counts = defaultdict(float), defaultdict(int)
    instrumented = False
    for ctx in (int(c) for c in args.contexts.split(",")):
        ids = torch.randint(0, llm.cfg.vocab_size, (ctx,), generator=gen).tolist()
        plain = [token_times(llm, ids, args.new_tokens) for _ in range(2)]  # first and warm call, unprofiled
        if not instrumented:
            instrument(dev, times, counts)
            instrumented = True
        times.clear(), counts.clear()
        prof = token_times(llm, ids, args.new_tokens)
        stage = dict(times)
        if "attention (all)" in stage:
            stage["qkv+rope+o_proj"] = stage["attention (all)"] - sum(
                stage.get(k, 0.0) for k in ("kv append", "exact attention", "sparse attention", "shadow+index fit",
                                            "disk spill"))
        run = {"context": ctx, "first_call": plain[0], "warm_call": plain[1], "profiled_call": prof,
               "stage_s": {k: round(v, 4) for k, v in sorted(stage.items(), key=lambda kv: -kv[1])},
               "stage_calls": dict(counts)}
        out["runs"].append(run)
        print(json.dumps({"context": ctx, "stage_s": run["stage_s"], "first": plain[0]["token_s"][:3],
                          "warm": plain[1]["token_s"][:3], "prefill_tok_s": plain[1]["stats"]["prefill_tok_s"]}),
              flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
