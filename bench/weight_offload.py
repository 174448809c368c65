"""Decode under several GPU budgets side by side (issue 18 targets): for each budget, `tierkv bench decode`'s rows
(tierkv loaded under the plan, and hf-accelerate at the same budget), then one table of measured ms/token beside
the plan's prediction and the weights bound max(streamed weights / measured link, GPU-read weights / measured HBM),
with the peak against the budget.

GPU run (8B shape at 32K, the issue's three budgets):
    python bench/weight_offload.py --model llama3.1-8b --context 32K --budgets 12GiB,16GiB,24GiB \
        --systems tierkv-sparse,tierkv-exact,hf-accelerate --out bench/results/weight_offload_8b_32k.json
32B shape at 128K on 24 GiB with 96 GiB of host memory:
    python bench/weight_offload.py --model qwen2.5-32b --context 128K --budgets 24GiB --cpu-budget 96GiB \
        --systems tierkv-sparse --steps 8 --warmup 2 --out bench/results/weight_offload_32b_128k.json
CPU smoke run: python bench/weight_offload.py --model llama-tiny --context 512 --budgets 300MiB \
    --systems tierkv-exact --steps 2 --warmup 1 --device cpu
Ends with one JSON line (device, date, command and the rows); the same JSON goes to --out.
"""

from __future__ import annotations

import argparse

from tierkv.bench.common import bench_device, emit, format_context, parse_contexts, run_record
from tierkv.bench.decode import run_decode
from tierkv.bench.systems import DecodeSpec
from tierkv.config import format_size, parse_size
from tierkv.llm import resolve_dtype

KEEP = ("system", "context", "status", "reason", "decode_ms", "peak_memory_bytes", "within_budget", "plan_ms",
        "weights_bound_ms", "link_bound_ms", "weights", "floor_ms", "settings")


def fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("budget", "context", "system", "status", "ms/tok", "plan ms", "w-bound ms", "x w-bound", "x link-bound",
            "peak GiB",
            "streamed MB/tok", "GB/s", "layers gpu/host/disk/cpu")
    body = []
    for r in rows:
        ms = r["decode_ms"]["median"] if r.get("decode_ms") else None
        w = r.get("weights") or {}
        counts = w.get("counts") or (r.get("settings") or {}).get("plan", {}).get("counts")
        body.append((format_size(r["budget"]), format_context(r["context"]), r["system"], r["status"], fmt(ms),
                     fmt(r.get("plan_ms")), fmt(r.get("weights_bound_ms")),
                     fmt(ms / r["weights_bound_ms"] if ms and r.get("weights_bound_ms") else None, ".3f"),
                     fmt(ms / r["link_bound_ms"] if ms and r.get("link_bound_ms") else None, ".3f"),
                     fmt(r["peak_memory_bytes"] / 2**30 if r.get("peak_memory_bytes") else None),
                     fmt(w["streamed_bytes_per_token"] / 1e6 if w.get("streamed_bytes_per_token") else None, ".0f"),
                     fmt(w.get("achieved_gbps"), ".1f"),
                     "/".join(str(counts[p]) for p in ("gpu", "host", "disk", "cpu")) if counts else "-"))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    return "\n".join("  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in (head, *body))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--context", default="32K")
    ap.add_argument("--budgets", default="12GiB,16GiB,24GiB", help="Comma list of GPU budgets, one run each.")
    ap.add_argument("--cpu-budget", default=None)
    ap.add_argument("--disk-dir", default=None)
    ap.add_argument("--systems", default="tierkv-sparse,tierkv-exact,hf-accelerate")
    ap.add_argument("--reserve", default="2GiB", help="hf-accelerate: GPU bytes kept for activations.")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--token-budget", type=int, default=2048,
                    help="sparse: tokens attended per step, 2048 as in the recorded runs (tierkv bench decode's "
                         "default is the library's: 1/8 of the context, at least 2,048 tokens)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = bench_device(a.device)
    rows, docs = [], []
    for budget in a.budgets.split(","):
        spec = DecodeSpec(model=a.model, contexts=parse_contexts(a.context), device=dev,
                          dtype=resolve_dtype(None, dev), systems=tuple(a.systems.split(",")),
                          gpu_budget=parse_size(budget, "--budgets"),
                          cpu_budget=parse_size(a.cpu_budget, "--cpu-budget"),
                          disk_dir=a.disk_dir, reserve=parse_size(a.reserve, "--reserve"), steps=a.steps,
                          warmup=a.warmup, token_budget=a.token_budget)
        doc = run_decode(spec, log=lambda s: print(f"weight_offload: {s}", flush=True))
        docs.append(doc)
        rows += [{"budget": spec.gpu_budget, **{k: r.get(k) for k in KEEP}} for r in doc["rows"]]
    print(table(rows))
    emit({"bench": "weight_offload", "model": a.model, "rows": rows, "rates": docs[0]["rates"] if docs else None,
          **run_record(dev)}, a.out)


if __name__ == "__main__":
    main()
