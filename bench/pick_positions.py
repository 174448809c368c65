"""Where in the context a sparse decode step's picks fall, on the real default model (SmolLM2, real text:
pydoc topics, greedy): the share of attended picks in each quarter of the chunks. It is why the GPU-resident
copies (tierkv/kv/storage/resident.py) hold the last chunks rather than the first.

    python bench/pick_positions.py --context 6144 --steps 32 --out bench/results/x.json
Ends with one JSON line (machine, date, command).
"""

from __future__ import annotations

import argparse
import platform

import torch

import tierkv
import tierkv.kv.caches.sparse as sparse_kv
from tierkv.bench.common import emit, run_record
from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from pydoc_data.topics import topics

    llm = tierkv.load(device="cpu", dtype="fp32")
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:args.context]
    picks = []
    entries = sparse_kv.sparse_entries

    def recording(top, score, n_picks, *rest, **kw):  # the cache's own entry builder, recording attended picks
        slots, lengths, cids = entries(top, score, n_picks, *rest, **kw)
        picks.append(top[lengths[:, -top.shape[1]:] > 0].clone())
        return slots, lengths, cids

    sparse_kv.sparse_entries = recording
    tier = TierConfig(attention="sparse")
    c = llm.cfg
    cache = sparse_kv.SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                                    config=tier, capacity=len(ids) + args.steps + 1, rope=llm.model.rope)
    with torch.no_grad():
        logits = prefill(llm.model, torch.tensor(ids), cache, tier.prefill_chunk)
        list(generate_ids(eager_step(llm.model, cache), logits, len(ids), args.steps, set(), GenStats()))
    at = torch.cat(picks).float() / cache.n_chunks  # position of each pick as a fraction of the chunks
    quarters = [float(((at >= q / 4) & (at < (q + 1) / 4)).float().mean()) for q in range(4)]
    out = {"bench": "pick_positions", "model": "SmolLM2-135M-Instruct", "context": len(ids), "steps": args.steps,
           "token_budget": tier.token_budget, "budget_floor_tokens": tier.budget_floor_tokens,
           "budget_tokens": tier.budget_tokens(len(ids)), "chunks": cache.n_chunks, "picks": at.numel(),
           "share_by_quarter": quarters, "threads": args.threads, "python": platform.python_version(),
           **run_record(torch.device("cpu"))}
    cache.close()
    emit(out, args.out)


if __name__ == "__main__":
    main()
