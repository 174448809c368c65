"""Where the first generate call of a process spends the time between prefill end and the second token.

Session 10 measured 4.1-4.6 s of decode-graph capture on the first call at 32K and 128K (H100, 8B shape), in two
processes with a warm Triton cache; the target is 1.5 s. This runs one first call and reports the
capture split by phase (eager warm-up steps, graph recording, the sync that ends it), the Triton kernels compiled
during the call, and the functions with the most cumulative and own time inside the capture (cProfile). A second, warm call follows for contrast.

    python bench/profile_first_call.py --model llama3.1-8b --context 32768 --kv-gpu-budget 24GiB --out r.json
CPU smoke run (no graph, so no capture): --model llama-tiny --context 1024 --device cpu
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import string
import sys
import time
from pathlib import Path

import torch

import tierkv


def _triton_kernels() -> set[str]:
    """Entries of Triton's on-disk cache, as 'hash/kernel.json' (one per compiled specialization)."""
    root = Path(os.environ.get("TRITON_CACHE_DIR", Path.home() / ".triton" / "cache"))
    return {f"{f.parent.name}/{f.name}" for f in root.rglob("*.json")
            if not f.name.startswith("__grp__")} if root.exists() else set()


def _triton_cache_files() -> int:
    return len(_triton_kernels())


class _CaptureProfile:
    """cProfile around each GraphStep._capture only (the generator of a stream confuses a whole-call profile)."""

    def __init__(self) -> None:
        from tierkv.graph import GraphStep
        self.prof, self.cls, self.orig = cProfile.Profile(), GraphStep, GraphStep._capture
        prof, orig = self.prof, self.orig

        self.calls = 0

        def _capture(step) -> None:
            self.calls += 1
            prof.enable()
            try:
                orig(step)
            finally:
                prof.disable()
        GraphStep._capture = _capture

    def close(self) -> None:
        self.cls._capture = self.orig


def _top(prof: cProfile.Profile, key: str, n: int) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(n)
    return buf.getvalue()


def _call(llm, ids: list[int], max_new: int, profile: bool) -> dict:
    kernels_before = _triton_kernels()
    cap = _CaptureProfile() if profile else None
    t0 = time.perf_counter()
    times = []
    for _ in llm.stream_ids(ids, max_new_tokens=max_new):
        times.append(time.perf_counter())
    if cap:
        cap.close()
    s = llm.stats
    end = t0 + s["cache_setup_s"] + s["prefill_s"]
    _, step = llm.kept("generate")
    out = {"cache_setup_s": round(s["cache_setup_s"], 3), "prefill_s": round(s["prefill_s"], 3),
           "prefill_end_to_first_token_ms": round(1000 * (times[0] - end), 1),
           "prefill_end_to_second_token_ms": round(1000 * (times[1] - end), 1),
           "triton_kernels_compiled": sorted(_triton_kernels() - kernels_before)}
    if step is not None:
        out |= {"captures": step.captures, "capture_s": round(step.capture_s, 3),
                "capture_phases": {k: round(v, 3) for k, v in step.capture_phases.items()},
                "eager_steps": step.eager_steps}
    if cap and cap.calls:
        out["capture_profile"] = _top(cap.prof, "cumulative", 70)
        out["capture_profile_tottime"] = _top(cap.prof, "tottime", 30)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3.1-8b")
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--device", default=None)
    p.add_argument("--kv-gpu-budget", default=None)
    p.add_argument("--max-new-tokens", type=int, default=4)
    p.add_argument("--prompt", choices=("random", "text"), default="random",
                   help="random token ids, or bench/chat_graph.py's letters-and-spaces text (what its first call sees)")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tier = {"attention": "sparse"} | ({"kv_gpu_budget": args.kv_gpu_budget} if args.kv_gpu_budget else {})
    files0 = _triton_cache_files()
    llm = tierkv.load(args.model, device=args.device, **tier)
    load_s = time.perf_counter() - t0
    files_at_load = _triton_cache_files() - files0
    if args.prompt == "text":
        rng = random.Random(0)
        text = "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(args.context))
        ids = llm.encode(prompt=text)[:args.context]
    else:
        ids = torch.randint(0, llm.cfg.vocab_size, (args.context,), generator=torch.Generator().manual_seed(1)).tolist()
    first = _call(llm, ids, args.max_new_tokens, profile=True)
    warm = _call(llm, ids, args.max_new_tokens, profile=False)
    dev = torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu"
    llm.close()
    res = {"device": dev, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
           "context": args.context, "prompt": args.prompt, "tokens": len(ids), "load_s_with_warm_up": round(load_s, 2),
           "triton_cache_files_added_at_load": files_at_load,
           "first_call": first, "warm_call": warm}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    for key in ("capture_profile", "capture_profile_tottime"):
        print(first.pop(key, ""))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
