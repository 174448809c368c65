"""Chat on the one sparse cache: chat decode ms/token against generate's at the same context, turn after turn; the
time from prefill end to the first and second token (first call of the process and warm); a saved and resumed
session's next reply against the uninterrupted one; decode-graph captures per call.

GPU run (random-weight Llama-3.1-8B shape, attention="sparse"):
    python bench/chat_graph.py --model llama3.1-8b --context 32768 --kv-gpu-budget 24GiB --device cuda \
        --out bench/results/chat_graph_32k.json
CPU smoke run: python bench/chat_graph.py --model llama-tiny --context 2048 --device cpu --out /tmp/chat_graph.json
Ends with one JSON line (device, date, command and the numbers); the same JSON goes to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import torch

import tierkv


def _sync(llm) -> None:
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)


def _text(n_chars: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(string.ascii_lowercase + "  ") for _ in range(n_chars))


def _timed_tokens(it) -> tuple[list[int], list[float]]:
    """Token ids of a stream and the wall time at which each arrived."""
    toks, times = [], []
    for t in it:
        toks.append(t)
        times.append(time.perf_counter())
    return toks, times


def _generate(llm, ids: list[int], max_new: int) -> dict:
    """One generate call: prefill end -> first and second token (ms), steady decode ms/token, captures."""
    t0 = time.perf_counter()
    toks, times = _timed_tokens(llm.stream_ids(ids, max_new_tokens=max_new))
    s = llm.stats
    # stream_ids builds (or empties) the call's cache, then prefills, syncs and times both
    end = t0 + s["cache_setup_s"] + s["prefill_s"]
    steady = 1000 * (times[-1] - times[2]) / max(1, len(times) - 3) if len(times) > 3 else None
    _, step = llm.kept("generate")
    return {"cache_setup_s": round(s["cache_setup_s"], 3), "prefill_s": round(s["prefill_s"], 3),
            "call_to_first_token_s": round(times[0] - t0, 3),
            "prefill_end_to_first_token_ms": round(1000 * (times[0] - end), 2),
            "prefill_end_to_second_token_ms": round(1000 * (times[1] - end), 2),
            "decode_ms_per_token": round(s["decode_ms_per_token"], 3), "steady_ms_per_token": round(steady, 3)
            if steady else None, "tokens": toks,
            "captures": step.captures if step is not None else 0,
            "capture_s": round(step.capture_s, 3) if step is not None else 0, "kv_path": s["kv"]["path"],
            "token_budget": llm.tier.budget_tokens(len(ids) + len(toks))}


def _turn(chat, text: str) -> dict:
    """One chat turn, timed as the user sees it (text pieces) and per token (the turn's decode stats). Random
    weights emit many bytes that are not complete UTF-8, so pieces are fewer than tokens: ms per piece is not
    ms per token (session 7 compared the two and reported chat 1.7-2.3x slower than generate)."""
    t0 = time.perf_counter()
    _, times = _timed_tokens(chat.stream(text))
    st = chat.stats
    end = t0 + st["last_turn"]["prefill_s"]
    per_piece = 1000 * (times[-1] - times[2]) / max(1, len(times) - 3) if len(times) > 3 else None
    step, turn = chat.graph_step, chat.last_turn
    kv = chat.cache.stats()  # counters since the cache was built (a capacity move builds a new one)
    return {"context": st["tokens_in_context"], "prefilled": st["last_turn"]["prefilled"],
            "prefill_s": round(st["last_turn"]["prefill_s"], 3),
            "prefill_end_to_first_piece_ms": round(1000 * (times[0] - end), 2) if times else None,
            "decode_ms_per_token": round(1000 / turn.decode_tok_s, 3) if turn.decode_tok_s else None,
            "new_tokens": turn.new_tokens, "pieces": len(times),
            "ms_per_piece": round(per_piece, 3) if per_piece else None,
            "reply": chat.messages[-1]["content"], "captures": step.captures if step else 0,
            "cache": st["cache"], "token_budget": chat.llm.tier.budget_tokens(st["tokens_in_context"]),
            "rolled_back": st["last_turn"]["rolled_back"], "capacity": chat.cache.capacity,
            "kv": {k: kv.get(k) for k in ("fits", "folds", "unfolds", "covered", "sparse_steps", "dense_steps")}
            | {"keys_resident": kv.get("resident_values", {}).get("keys_too")}}


def run(args: argparse.Namespace) -> dict:
    tier = {"attention": "sparse", "kv_gpu_budget": args.kv_gpu_budget, "cpu_budget": args.cpu_budget,
            "disk_dir": args.disk_dir}
    t0 = time.perf_counter()
    llm = tierkv.load(args.model, device=args.device, dtype=args.dtype, **{k: v for k, v in tier.items() if v})
    load_s = time.perf_counter() - t0
    ids = llm.encode(prompt=_text(args.context, 0))[:args.context]
    first = _generate(llm, ids, args.max_new_tokens)  # the first call of the process
    warm = _generate(llm, ids, args.max_new_tokens)  # the same capacity class: kept cache and graph
    # chat: the context as the system message (the shapes have no template: render() joins roles as text)
    chat = llm.chat(context=_text(args.context - 200, 0), max_new_tokens=args.max_new_tokens, progress=False)
    turns = [_turn(chat, _text(60, 1 + i)) for i in range(args.turns)]
    with tempfile.TemporaryDirectory() as tmp:
        before = [_turn(chat, _text(60, 100))]  # a turn, then save, then the uninterrupted next turn
        chat.save(Path(tmp) / "s")
        nxt = _turn(chat, _text(60, 101))
        chat.close()
        t1 = time.perf_counter()
        resumed = tierkv.Chat.load(Path(tmp) / "s", llm, max_new_tokens=args.max_new_tokens)
        resume_s = time.perf_counter() - t1
        again = _turn(resumed, _text(60, 101))
        resumed.close()
    ratio = [t["decode_ms_per_token"] / warm["decode_ms_per_token"] for t in turns
             if t["decode_ms_per_token"] and warm["decode_ms_per_token"]]
    dev = torch.cuda.get_device_name() if llm.device.type == "cuda" else "cpu"
    llm.close()
    return {"device": dev, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
            "model": args.model, "context": len(ids), "load_s": round(load_s, 2),
            "generate_first_call": {k: v for k, v in first.items() if k != "tokens"},
            "generate_warm_call": {k: v for k, v in warm.items() if k != "tokens"},
            "same_tokens_first_and_warm": first["tokens"] == warm["tokens"],
            "chat_turns": turns, "chat_over_generate_ms_per_token": [round(r, 3) for r in ratio],
            "resume_s": round(resume_s, 2), "resumed_reply_equals_uninterrupted": again["reply"] == nxt["reply"],
            "turn_before_save": before[0], "uninterrupted": nxt, "resumed": again}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama3.1-8b", help="built-in shape (random weights) or model folder")
    p.add_argument("--context", type=int, default=32768, help="tokens of context")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--kv-gpu-budget", default=None)
    p.add_argument("--cpu-budget", default=None)
    p.add_argument("--disk-dir", default=None)
    p.add_argument("--out", required=True, help="JSON result path")
    args = p.parse_args(argv)
    res = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
