"""Where a `tierkv bench decode` row's peak device memory comes from (issue 18: the 32K / 16 GiB row peaks 1.5 MB
over its gpu_budget). Records the CUDA caching allocator's history for one row, replays its alloc/free events to
find the moment torch's allocated bytes peak, and lists the blocks live then, grouped by the tierkv frame that
allocated them.

    python bench/profile_peak.py --model llama3.1-8b --context 32K --gpu-budget 16GiB --out peak.json
Ends with one JSON line (device, date, command, the peak, its top groups); the same JSON goes to --out.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from tierkv.bench.common import emit, parse_contexts, run_record
from tierkv.bench.decode import run_decode
from tierkv.bench.systems import DecodeSpec
from tierkv.cli.common import parse_token_budget
from tierkv.config import parse_size


def origin(frames: list[dict]) -> str:
    """The innermost tierkv frame (file:line function), else the innermost frame with a file name."""
    for f in frames:
        name = f.get("filename", "")
        if "/tierkv/" in name and "/bench/" not in name:
            return f"{name.split('/tierkv/')[-1]}:{f.get('line')} {f.get('name')}"
    for f in frames:
        if f.get("filename") and not f["filename"].startswith("??"):
            return f"{f['filename'].rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}"
    return "(no python frame: allocated inside a kernel library or a graph pool)"


def peak_blocks(trace: list[dict], start: int = 0) -> tuple[int, int, dict[int, dict]]:
    """Replay alloc / free_requested events: (peak allocated bytes at or after event `start`, event index of the
    peak, live blocks then). Events before `start` only build the live set: the bench resets its peak there."""
    live: dict[int, dict] = {}
    now = peak = at = 0
    best: dict[int, dict] = {}
    for i, ev in enumerate(trace):
        if ev["action"] == "alloc":
            live[ev["addr"]] = ev
            now += ev["size"]
            if now > peak and i >= start:
                peak, at, best = now, i, dict(live)
        elif ev["action"] == "free_requested" and ev["addr"] in live:
            now -= live.pop(ev["addr"])["size"]
    return peak, at, best


def mark_resets(dev: torch.device) -> list[int]:
    """Trace lengths at each torch.cuda.reset_peak_memory_stats call from now on (the bench's peak counts from
    its last one)."""
    marks: list[int] = []
    reset = torch.cuda.reset_peak_memory_stats

    def marked(*args, **kwargs):
        marks.append(len(torch.cuda.memory._snapshot()["device_traces"][dev.index or 0]))
        return reset(*args, **kwargs)

    torch.cuda.reset_peak_memory_stats = marked
    return marks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama3.1-8b")
    ap.add_argument("--context", default="32K")
    ap.add_argument("--gpu-budget", default="16GiB")
    ap.add_argument("--reserve", default="2GiB")
    ap.add_argument("--token-budget", default=None, help="tokens (2048) or a fraction; default: tierkv's default")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-entries", type=int, default=2_000_000)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    dev = torch.device("cuda")
    budget = parse_token_budget(a.token_budget)
    extra = {} if budget is None else {"token_budget": budget}
    spec = DecodeSpec(model=a.model, contexts=parse_contexts(a.context), device=dev, dtype=torch.bfloat16,
                      systems=("tierkv-sparse",), gpu_budget=parse_size(a.gpu_budget, "--gpu-budget"),
                      reserve=parse_size(a.reserve, "--reserve"), steps=a.steps, warmup=a.warmup, **extra)
    torch.cuda.memory._record_memory_history(max_entries=a.max_entries, stacks="python")
    resets = mark_resets(dev)
    doc = run_decode(spec, log=lambda s: print(f"profile_peak: {s}", flush=True))
    snap = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snap["device_traces"][dev.index or 0]
    # the row's peak counts from the generate call's reset (LLM.stream_ids), after the model was built and loaded
    start = resets[-1] if resets else 0
    peak, at, live = peak_blocks(trace, start)
    groups: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ev in live.values():
        g = groups[origin(ev.get("frames", []))]
        g[0] += ev["size"]
        g[1] += 1
    top = sorted(groups.items(), key=lambda kv: -kv[1][0])[: a.top]
    row = doc["rows"][0] if doc["rows"] else {}
    budget = spec.gpu_budget
    print(f"replayed peak {peak} bytes at event {at} of {len(trace)} (counted from event {start}); "
          f"bench peak {row.get('peak_memory_bytes')}; budget {budget} (over by {(row.get('peak_memory_bytes') or 0) - budget})")
    for name, (nbytes, count) in top:
        print(f"{nbytes / 2**20:12.2f} MiB  {count:6d} blocks  {name}")
    emit({"bench": "profile_peak", "model": a.model, "context": spec.contexts, "gpu_budget": budget,
          "bench_peak_bytes": row.get("peak_memory_bytes"), "replayed_peak_bytes": peak, "events": len(trace),
          "trace_full": len(trace) >= a.max_entries, "peak_event": at, "counted_from_event": start,
          "top": [{"origin": n, "bytes": b, "blocks": c} for n, (b, c) in top],
          "row": {k: row.get(k) for k in ("status", "reason", "decode_ms", "prefill_tok_s", "settings")},
          **run_record(dev)}, a.out)


if __name__ == "__main__":
    main()
