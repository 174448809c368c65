"""Chat sessions: time to save and to resume a long-context session against recomputing its prefill.

GPU run (random-weight Llama-3.1-8B shape, 128K context):
    python bench/chat_session.py --model llama3.1-8b --context 131072 --device cuda --out bench/results/chat_session.json
CPU smoke run: python bench/chat_session.py --model llama-tiny --context 4096 --device cpu --out /tmp/chat.json
Ends with one JSON line (device, date, command and the numbers); the same JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

import tierkv
from tierkv.config import format_size


def _sync(llm) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def _drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (root only) so the resume reads from the disk."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _context(n_tokens: int, seed: int = 0) -> str:
    """Random words; the random-weight shapes tokenize one byte per token."""
    rng = random.Random(seed)
    words, size = [], 0
    while size < n_tokens:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9)))
        words.append(w)
        size += len(w) + 1
    return " ".join(words)[:n_tokens]


def run(args: argparse.Namespace) -> dict:
    tiers = {k: v for k, v in (("kv_gpu_budget", args.kv_gpu_budget), ("cpu_budget", args.cpu_budget),
                                ("disk_dir", args.disk_dir)) if v is not None}
    llm = tierkv.load(args.model, device=args.device, dtype=args.dtype, **tiers)
    gen = {"max_new_tokens": args.max_new_tokens, "progress": False}
    if tiers:
        gen["budget_share"] = 0.5  # the original and the resumed session are open side by side
    margin = 64 + args.max_new_tokens
    text = _context(args.context - margin)
    warm = llm.chat(context=_context(512, seed=1), **gen)  # compile and warm kernels outside the timings
    warm.send("warm up")
    warm.close()

    t0 = time.perf_counter()
    chat = llm.chat(context=text, **gen)
    _sync(llm)
    prefill_s = time.perf_counter() - t0
    n_ctx = chat.prefix_len
    chat.send("First question about the context.")
    turn1 = dict(chat.stats["last_turn"])

    root = Path(args.session_dir or tempfile.mkdtemp(prefix="tierkv-chat-bench-"))
    path = root / "session"
    saved = chat.save(path)
    dropped = _drop_page_cache() if args.drop_cache else False
    t0 = time.perf_counter()
    resumed = tierkv.Chat.load(path, llm, **gen)
    _sync(llm)
    load_s = time.perf_counter() - t0
    a = chat.send("Second question.")
    b = resumed.send("Second question.")
    out = {
        "model": args.model, "device_kind": llm.device.type, "dtype": str(llm.dtype).removeprefix("torch."),
        "tiers": tiers, "context_tokens": n_ctx, "session_tokens": resumed.restored["tokens"],
        "prefill_s": prefill_s, "prefill_tok_s": n_ctx / prefill_s,
        "first_turn_prefilled": turn1["prefilled"], "first_turn_prefill_s": turn1["prefill_s"],
        "save_s": saved["seconds"], "save_bytes": saved["bytes"], "save_GBps": saved["bytes"] / saved["seconds"] / 1e9,
        "save_swap": saved["swap"], "resume_s": load_s, "resume_GBps": saved["bytes"] / load_s / 1e9,
        "page_cache_dropped": dropped, "resume_speedup_vs_prefill": prefill_s / load_s,
        "resumed_reply_equal": a == b, "resumed_turn_prefilled": resumed.stats["last_turn"]["prefilled"],
        "cache": resumed.stats["cache"], "tier_bytes_after_resume": resumed.stats["tier_bytes"],
    }
    chat.close()
    resumed.close()
    llm.close()
    if not args.keep:
        shutil.rmtree(root if args.session_dir is None else path, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3.1-8b", help="built-in shape (random weights) or model folder")
    p.add_argument("--context", type=int, default=131072, help="session tokens (context + one turn)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--kv-gpu-budget", default=None)
    p.add_argument("--cpu-budget", default=None)
    p.add_argument("--disk-dir", default=None)
    p.add_argument("--session-dir", default=None, help="where the session is written (default: a temp dir)")
    p.add_argument("--drop-cache", action="store_true", help="drop the page cache before resuming (needs root)")
    p.add_argument("--keep", action="store_true", help="keep the saved session")
    p.add_argument("--out", required=True, help="JSON result path")
    args = p.parse_args(argv)
    res = run(args)
    info = {"device": torch.cuda.get_device_name(0) if res["device_kind"] == "cuda" else "cpu",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    res = {**info, **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"context {res['context_tokens']} tok: prefill {res['prefill_s']:.2f} s | save {res['save_s']:.2f} s "
          f"({format_size(res['save_bytes'])}) | resume {res['resume_s']:.2f} s ({res['resume_speedup_vs_prefill']:.1f}x "
          f"faster than prefill) | reply equal: {res['resumed_reply_equal']}", file=sys.stderr)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
