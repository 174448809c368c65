"""Issue 17: passkey retrieval, full attention against the default sparse settings, over depths 0.1..0.9.

A random 5-digit key is hidden at each depth of filler text of --lengths tokens (default 8K; 16K and 32,700 as
options: prompt and reply fit Gemma 3's 32,768 positions) and asked for at the end (the chat template where the
model has one, else a plain completion prompt: tierkv/bench/passkey.py); retrieved = the greedy reply contains the
key. One prefill per prompt, replayed into each method's cache. A method the factory refuses (the sparse cache and
sliding windows, before it takes them) is recorded per row as "error". Ends with one JSON line; --plot draws the
grid.
  python bench/passkey_sweep.py --device cuda --lengths 8K,16K,32700 \
      --out bench/results/passkey-gemma3-270m-h200-<date>.json \
      --plot bench/results/passkey-gemma3-270m-h200-<date>.png
--model smollm2 (8K positions: --lengths 6K) or any model tierkv.load takes; the default is gemma3.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the model names of long_fidelity.py

import tierkv  # noqa: E402
from long_fidelity import resolve_model  # noqa: E402
from tierkv.bench.common import emit, parse_contexts, run_record  # noqa: E402
from tierkv.bench.fidelity import METHODS  # noqa: E402
from tierkv.bench.passkey import sweep_rows  # noqa: E402
from tierkv.errors import TierKVError  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", help="gemma3 (default), smollm2, or a GGUF / folder / model id")
    ap.add_argument("--lengths", default="8K", help="prompt tokens, e.g. 8K or 8K,16K,32700")
    ap.add_argument("--depths", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9")
    ap.add_argument("--methods", default="full,sparse", help="of full, sparse, oracle")
    ap.add_argument("--seed", type=int, default=0, help="seeds the keys")
    ap.add_argument("--max-new", type=int, default=12, help="greedy tokens of the reply")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 on cuda and fp32 on the CPU by default")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared 2-core box)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG path for the retrieval grid")
    a = ap.parse_args()
    methods = [m for m in a.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        sys.exit(f"--methods {a.methods!r}: use some of {', '.join(METHODS)}")
    depths = [float(d) for d in a.depths.split(",") if d]
    if any(not 0 <= d <= 1 for d in depths):
        sys.exit(f"--depths {a.depths!r}: each depth is a fraction of the filler in [0, 1]")
    if a.threads:
        torch.set_num_threads(a.threads)
    llm = tierkv.load(resolve_model(a.model), device=a.device, dtype=a.dtype)
    rows = sweep_rows(llm, parse_contexts(a.lengths), depths, methods, a.seed, a.max_new,
                      log=lambda row: print(json.dumps(row), file=sys.stderr, flush=True))
    summary = {m: f"{sum(r.get('retrieved', False) for r in rows if r['method'] == m)}/"
                  f"{sum(1 for r in rows if r['method'] == m and 'retrieved' in r)}" for m in methods}
    tier = llm.tier
    doc = {"bench": "passkey", "model": f"{a.model} ({llm.cfg.model_type}) {str(llm.dtype).split('.')[-1]}",
           "source": llm.source, "prompt": "chat" if getattr(llm.tokenizer, "chat_template", None) else "plain",
           "sparse_settings": {"token_budget": tier.token_budget, "budget_floor_tokens": tier.budget_floor_tokens,
                               "chunk_size": tier.chunk_size, "sink_tokens": tier.sink_tokens,
                               "window_tokens": tier.window_tokens},
           "retrieved": summary, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows,
           **run_record(llm.device)}
    if a.plot:
        from tierkv.bench.fidelity_plot import plot_passkey

        plot_passkey(doc, a.plot)
    emit(doc, a.out)


if __name__ == "__main__":
    try:
        main()
    except TierKVError as exc:  # a bad argument or a refused setting: one line, no traceback
        sys.exit(f"error: {exc}")
