"""Does keeping exact keys for more chunks (a lower SparseOptions.outlier_threshold: the relative per-chunk error of
the key shadow above which a chunk keeps its exact keys) close Gemma 3 270M's gap to the oracle? Exploratory: the
threshold is not a user setting, so this swaps the sparse cache module's SparseOptions for one with the threshold
set. Budget 2,048 tokens, 256 teacher-forced positions, CPU fp32, 2 threads; one JSON line per threshold.

    python bench/outlier_threshold_sweep.py 16384 0.5,0.3,0.2,0.1
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the model and text helpers of long_fidelity.py

import tierkv  # noqa: E402
import tierkv.kv.caches.sparse as sparse_cache  # noqa: E402
from long_fidelity import load_text, resolve_model  # noqa: E402
from tierkv.bench.fidelity import context_rows  # noqa: E402
from tierkv.kv.sparse.options import SparseOptions  # noqa: E402


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python bench/outlier_threshold_sweep.py CONTEXT THRESHOLDS (e.g. 16384 0.5,0.3,0.2,0.1)")
    torch.set_num_threads(2)
    n, thresholds = int(sys.argv[1]), [float(t) for t in sys.argv[2].split(",")]
    llm = tierkv.load(resolve_model("gemma3"), device="cpu")
    text, _ = load_text(None)
    ids = llm.tokenizer(text)["input_ids"][:n + 256]
    for th in thresholds:
        sparse_cache.SparseOptions = functools.partial(SparseOptions, outlier_threshold=th)
        for r in context_rows(llm, ids, n, ["2048"], ["sparse"]):
            if r["method"] == "sparse":
                print(json.dumps({"threshold": th, **{k: r.get(k) for k in ("agreement", "nll_delta", "kv")}}),
                      flush=True)


if __name__ == "__main__":
    main()
