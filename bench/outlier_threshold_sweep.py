"""Does keeping exact keys for more chunks (a lower SparseOptions.outlier_threshold: the relative per-chunk error of
the key shadow above which a chunk keeps its exact keys) close Gemma 3 270M's gap to the oracle? Exploratory: the
threshold is not a user setting, so this swaps the sparse cache module's SparseOptions for one with the threshold
set. Budget 2,048 tokens, 256 teacher-forced positions, CPU fp32, 2 threads; one JSON line per threshold.

    python bench/outlier_threshold_sweep.py 16384 0.5,0.3,0.2,0.1
"""
import functools, json, sys, torch
sys.path.insert(0, "bench")
import tierkv
import tierkv.kv.caches.sparse as sc
from tierkv.kv.sparse.options import SparseOptions
from tierkv.bench.fidelity import context_rows
from long_fidelity import resolve_model, load_text
torch.set_num_threads(2)
n = int(sys.argv[1]); ths = [float(t) for t in sys.argv[2].split(",")]
llm = tierkv.load(resolve_model("gemma3"), device="cpu")
text, label = load_text(None)
ids = llm.tokenizer(text)["input_ids"][:n + 256]
for th in ths:
    sc.SparseOptions = functools.partial(SparseOptions, outlier_threshold=th)
    rows = context_rows(llm, ids, n, ["2048"], ["sparse"])
    for r in rows:
        if r["method"] == "sparse":
            print(json.dumps({"threshold": th, **{k: r.get(k) for k in ("agreement", "nll_change", "kv")}}), flush=True)
