"""Issue 5: sparse vs full attention on SmolLM2 over real text (pydoc topics): top-1 agreement and NLL.

The prompt is prefilled once (exact attention) and its K/V replayed into a fresh cache per configuration,
so each point costs only its teacher-forced decode steps. Ends with one JSON line; writes it to --out.
Usage: python bench/sparse_accuracy.py --context 6144 --steps 256 --sweep all --out bench/results/x.json
--device cuda --dtype bf16 runs it on the GPU. --text takes other real text: plain files (joined by blank lines) or pydoc:PATH (another Python's
pydoc_data/topics.py, joined as the default text is); --skip drops that many leading tokens first.
Fractional budgets are the fraction alone (budget_floor_tokens=0, unless a run sets it), so the budget curve and
the "1/8 budget" runs measure what they name; TierConfig's default adds a 2,048-token floor.
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
import time

import torch

import tierkv
from tierkv.bench.common import run_record
from tierkv.bench.fidelity import compare
from tierkv.engine import eager_step, prefill
from tierkv.kv.caches.base import KVCache
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.eager_sparse import EagerSparseKVCache
from tierkv.kv.sparse.options import SparseOptions


class Recorder(DenseKVCache):
    """A dense cache that also keeps each layer's pre-RoPE keys, so its prefill can be replayed."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.k_pre: dict[int, list[torch.Tensor]] = {}

    def append(self, layer, k, v, k_pre=None) -> None:
        super().append(layer, k, v, k_pre)
        self.k_pre.setdefault(layer, []).append(k_pre.clone())

    def replay(self, cache: KVCache, n: int) -> None:
        """Append this prefill's n tokens, layer by layer, to another cache."""
        for layer in range(self.k.shape[0]):
            cache.append(layer, self.k[layer, :n], self.v[layer, :n], torch.cat(self.k_pre[layer])[:n])
        cache.advance(n)


def decode_rows(model, cache: KVCache, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Teacher-forced log-probs (len(ids) - S, V) of tokens S.. (S = cache.seq_len); row 0 is `first` (the
    prefill's last logits), the rest come through the decode path."""
    step = eager_step(model, cache)
    rows = [first] + [step(ids[p:p + 1], p)[-1] for p in range(cache.seq_len, ids.shape[0] - 1)]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()


def sweep(name: str) -> list[dict]:
    """Configurations: TierConfig fields plus SparseOptions fields (prefixed sp_); the defaults are the choice."""
    base = dict(token_budget=0.125, rank=32, chunk_size=32, sink_tokens=64, window_tokens=128)
    runs = []
    if name == "design":  # selection alone (exact keys for picks), then with keys rebuilt from the shadow
        for scorer, r in (("mean", 32), ("minmax", 32), ("lowrank-shared", 32), ("lowrank", 8), ("lowrank", 16),
                          ("lowrank", 32)):
            runs.append({**base, "sp_scorer": scorer, "sp_score_rank": r, "sp_rebuild": False, "group": "design"})
        for r in (16, 32, 64, 96):
            runs.append({**base, "rank": r, "sp_score_rank": 16, "group": "shadow-rank"})
        runs.append({**base, "chunk_size": 16, "sp_score_rank": 16, "group": "chunk"})
    if name == "focus":  # chunk size, score rank and a wide shadow together
        for cs, sr, r, rb in ((16, 16, 64, False), (16, 32, 64, True), (32, 32, 64, True), (16, 16, 64, True)):
            runs.append({**base, "chunk_size": cs, "rank": r, "sp_score_rank": sr, "sp_rebuild": rb, "group": "focus"})
        runs.append({**base, "rank": 64, "sp_scorer": "lowrank-shared", "sp_score_rank": 32, "group": "focus"})
    if name == "final":  # the defaults: oracle, budget curve, shadow-rank curve, a smaller sink/window split
        runs.append({"sp_score_rank": 64, "sp_rebuild": False, "group": "oracle"})
        for frac in (1 / 8, 1 / 64, 1 / 32, 1 / 16, 1 / 4):
            runs.append({"token_budget": frac, "group": "budget"})
        runs.append({"sink_tokens": 32, "window_tokens": 64, "group": "split"})
        for r in (16, 32, 64, 128):  # the default (96) is the 1/8 budget run
            runs.append({"rank": r, "group": "shadow-rank"})
    if name == "one":
        runs.append({"group": "one"})
    if name == "robust":  # each knob alone from the defaults, at 1/8: selection vs rebuild, then selection knobs
        runs.append({"group": "default"})
        runs.append({"sp_rebuild": False, "group": "selection-only"})
        for r in (96, 128):
            runs.append({"rank": r, "group": "shadow-rank"})
        for sr in (48, 64):
            runs.append({"sp_score_rank": sr, "group": "score-rank"})
        runs.append({"sp_reduce": "mass", "group": "reduce"})
        runs.append({"sp_outlier_threshold": 0.25, "group": "outlier"})
        runs.append({"sink_tokens": 32, "window_tokens": 64, "group": "split"})
        runs.append({"chunk_size": 16, "group": "chunk"})
        runs.append({"chunk_size": 16, "sink_tokens": 32, "window_tokens": 64, "group": "chunk"})
    return runs


def load_text(specs: list[str] | None) -> tuple[str, str]:
    """(text, label): the running Python's pydoc topics, or the given files / pydoc:PATH modules joined."""
    if not specs:
        from pydoc_data.topics import topics

        return "\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics"
    parts = []
    for spec in specs:
        if spec.startswith("pydoc:"):
            topics = runpy.run_path(spec[6:])["topics"]
            parts.append("\n\n".join(topics[k] for k in sorted(topics)))
        else:
            with open(spec, encoding="utf-8", errors="replace") as f:
                parts.append(f.read())
    return "\n\n".join(parts), " + ".join(specs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--sweep", default="final", choices=("design", "focus", "final", "one", "robust"))
    ap.add_argument("--configs", default=None, help="JSON list of runs (overrides --sweep)")
    ap.add_argument("--text", nargs="+", default=None, help="files, or pydoc:PATH to a pydoc_data/topics.py")
    ap.add_argument("--skip", type=int, default=0, help="leading tokens of the text to drop")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="fp32", help="fp32 or bf16 (both the full reference and the sparse runs)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    llm = tierkv.load(device=a.device, dtype=a.dtype)
    dev, dt = llm.device, llm.dtype
    text, label = load_text(a.text)
    ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][a.skip:a.skip + a.context + a.steps]
    if len(ids) < a.context + a.steps:
        sys.exit(f"the text has {len(ids)} tokens after --skip, {a.context + a.steps} needed")
    ids = torch.tensor(ids, device=dev)
    c, n = llm.cfg, a.context
    shape = (c.num_layers, c.num_kv_heads, c.head_dim)
    results = []
    with torch.no_grad():
        t0 = time.perf_counter()
        rec = Recorder(*shape, device=dev, dtype=dt, capacity=n + a.steps + 1)
        first = prefill(llm.model, ids[:n], rec, 2048)[-1]
        print(f"prefill {n} tokens: {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        full = DenseKVCache(*shape, device=dev, dtype=dt, capacity=n + a.steps + 1)
        rec.replay(full, n)
        ref = decode_rows(llm.model, full, ids, first)  # row i: token n + i
        targets = ids[n:].cpu()
        for run in json.loads(a.configs) if a.configs else sweep(a.sweep):
            t0 = time.perf_counter()
            tier = {k: v for k, v in run.items() if not k.startswith("sp_") and k != "group"}
            sp = SparseOptions(**{k[3:]: v for k, v in run.items() if k.startswith("sp_")})
            cfg = llm.tier.replace(attention="sparse", **{"budget_floor_tokens": 0, **tier})
            cache = EagerSparseKVCache(*shape, device=dev, dtype=dt, config=cfg, sparse=sp, rope=llm.model.rope)
            rec.replay(cache, n)
            lp = decode_rows(llm.model, cache, ids, first)
            st = cache.stats()["sparse"]
            cache.close()
            row = {**run, **compare(lp, ref, targets), "budget_floor_tokens": cfg.budget_floor_tokens,
                   "budget_tokens": cfg.budget_tokens(n),
                   "attended_fraction": st["attended_fraction"], "prefetch_recall": st["prefetch_recall"],
                   "outlier_chunks": st["outlier_chunks"], "seconds": round(time.perf_counter() - t0, 1)}
            results.append(row)
            print(json.dumps(row), file=sys.stderr)
    out = {"bench": "sparse_accuracy", "model": f"SmolLM2-135M-Instruct {a.dtype}", "text": label, "skip": a.skip,
           "context": n, "steps": a.steps, "threads": a.threads, "torch": torch.__version__, "results": results,
           **run_record(dev)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
