"""When do CPU-computed layers beat streaming them over the link (issue 18, item 5)? The same model under one
gpu_budget with the plan's spilled layers streamed from pinned memory (graph and eager), then with some or all of
them computed on the CPU (eager: a CPU layer waits on the host), through `tierkv.load(..., placement=...)`; beside
it the host's bf16 matrix-vector rate, the rate the planner weighs CPU layers by.

    python bench/cpu_layers.py --model llama3.1-8b --gpu-budget 12GiB --context 4096 --out cpu-layers.json

Ends with one JSON line; the same JSON goes to --out.
"""

from __future__ import annotations

import argparse
import time

import torch

import tierkv
from tierkv.bench.common import emit, run_record
from tierkv.bench.io import cpu_gemv_entries
from tierkv.models.shapes import shape_config
from tierkv.plan.load import plan_for_load


def ms_per_token(llm, prompt: list[int], new: int, skip: int) -> float:
    """Median gap between generated tokens after the first `skip` (prefill, capture)."""
    llm.stop_ids = set()
    stamps = [time.perf_counter() for _ in llm.stream_ids(prompt, max_new_tokens=new)]
    gaps = sorted(b - a for a, b in zip(stamps[skip:], stamps[skip + 1:]))
    return 1e3 * gaps[len(gaps) // 2]


def placements(spilled: list[int]) -> dict[str, str]:
    """Placement strings: the spilled layers streamed, half of them on the CPU, all of them on the CPU."""
    half = spilled[::2]
    rest = [i for i in spilled if i not in half]
    join = ",".join
    return {"streamed": f"host={join(map(str, spilled))}",
            "half on the CPU": f"cpu={join(map(str, half))}" + (f" host={join(map(str, rest))}" if rest else ""),
            "all on the CPU": f"cpu={join(map(str, spilled))}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--gpu-budget", default="12GiB")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--spill", default=None, help="layers to spill, e.g. '1,3' (default: the plan's)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = shape_config(a.model)
    plan = plan_for_load(cfg, torch.bfloat16, dev, a.context, a.gpu_budget).plan
    spilled = [int(i) for i in a.spill.split(",")] if a.spill else [i for i, p in enumerate(plan.layers) if p != "gpu"]
    if not spilled:
        raise SystemExit(f"cpu_layers: every layer fits gpu_budget={a.gpu_budget}; give a smaller one")
    print(f"cpu_layers: plan keeps {len(plan.layers) - len(spilled)} layers resident, spills {spilled}", flush=True)
    gemv, _ = cpu_gemv_entries([plan.layer_bytes[0]], 5)
    rows = []
    prompt = list(range(1, a.prompt + 1))
    runs = [("streamed, graph", placements(spilled)["streamed"], True)]
    runs += [(name, p, False) for name, p in placements(spilled).items()]
    for name, placement, graph in runs:
        llm = tierkv.load(a.model, device=dev, dtype="bf16", gpu_budget=a.gpu_budget, ctx_size=a.context,
                          placement=placement, graph=graph, warm_up=False)
        ms = ms_per_token(llm, prompt, a.new_tokens, 2)
        counts = llm.model.weights.stats()["counts"] if llm.model.weights is not None else {}
        rows.append({"run": name, "placement": placement, "graph": graph, "ms_per_token": ms, "counts": counts})
        print(f"cpu_layers: {name:<18} {ms:9.2f} ms/token  {counts}", flush=True)
        llm.close()
        del llm
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    base = next(r["ms_per_token"] for r in rows if r["run"] == "streamed")
    for r in rows:
        cpu = r["counts"].get("cpu", 0)
        r["ms_per_cpu_layer_vs_streamed"] = (r["ms_per_token"] - base) / cpu if cpu else None
    emit({"bench": "cpu_layers", "model": a.model, "gpu_budget": a.gpu_budget, "context": a.context,
          "layer_bytes": plan.layer_bytes[0], "cpu_gemv": gemv, "plan_bandwidths": plan.bandwidths, "rows": rows,
          **run_record(dev)}, a.out)


if __name__ == "__main__":
    main()
