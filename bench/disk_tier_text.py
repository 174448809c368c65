"""The sparse graph cache's disk tier on the real default model (SmolLM2, real text: pydoc topics, greedy):
the same run with every chunk in host memory and with `--disk-share` of the chunks moved to disk. Reports the
tokens (must match), ms/token (median and mean after the first decode step, which fits the shadows), how many
picks found their chunk in the host slots, how many replays missed a chunk on disk and were redone, and how
useful the reads ahead were. Random-weight benchmarks pick chunks evenly and cannot show this; real text picks
mostly recent chunks (bench/pick_positions.py).

    python bench/disk_tier_text.py --device cuda --context 7000 --steps 64 --out bench/results/x.json
Ends with one JSON line (machine, date, command).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import tierkv
from tierkv.bench.common import emit, run_record
from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.kv.caches.sparse import SparseKVCache


def run(llm, ids, steps, tier) -> dict:
    """Greedy decode of `steps` tokens after prefilling ids; graph replays on CUDA. Returns tokens, timing, stats."""
    from tierkv.graph import GraphStep

    c, model = llm.cfg, llm.model
    cache = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                          config=tier, capacity=len(ids) + steps + 1, rope=model.rope)
    try:
        with torch.no_grad():
            logits = prefill(model, torch.tensor(ids, device=model.device), cache, tier.prefill_chunk)
            step = GraphStep(model, cache) if model.device.type == "cuda" else eager_step(model, cache)
            toks, gaps, t = [], [], time.perf_counter()
            for tok in generate_ids(step, logits, len(ids), steps, set(), GenStats()):  # each token is synced
                toks.append(tok)
                gaps.append(1000 * (time.perf_counter() - t))
                t = time.perf_counter()
        st = cache.stats()
        later = sorted(gaps[2:])  # after the first decode step, which fits the shadows (and moves chunks to disk)
        return {"tokens": toks, "first_steps_ms": gaps[:2], "ms_per_token": later[len(later) // 2],
                "ms_per_token_mean": sum(later) / len(later), "host_bytes": cache.host_bytes,
                "hits": st["total"]["hits"], "disk_tier": st.get("disk_tier"),
                "eager_steps": getattr(step, "eager_steps", None), "replays": getattr(step, "replays", None)}
    finally:
        cache.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--context", type=int, default=7000)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--token-budget", type=int, default=512)
    ap.add_argument("--disk-share", type=float, default=0.25, help="share of the pool's bytes over cpu_budget")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pydoc_data.topics import topics

    llm = tierkv.load(device=args.device, dtype="bf16" if args.device == "cuda" else "fp32")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:args.context]
    tier = TierConfig(attention="sparse", token_budget=args.token_budget)
    base = run(llm, ids, args.steps, tier)
    with tempfile.TemporaryDirectory() as disk_dir:
        budget = int(base["host_bytes"] * (1 - args.disk_share))
        disk = run(llm, ids, args.steps, tier.replace(cpu_budget=budget, disk_dir=disk_dir))
    out = {"bench": "disk_tier_text", "model": "SmolLM2-135M-Instruct", "context": len(ids), "steps": args.steps,
           "token_budget": args.token_budget, "cpu_budget": budget, "same_tokens": base["tokens"] == disk["tokens"],
           "all_in_host": {k: v for k, v in base.items() if k != "tokens"},
           "with_disk": {k: v for k, v in disk.items() if k != "tokens"}, **run_record(llm.device)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
