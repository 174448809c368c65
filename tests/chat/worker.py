"""Subprocess side of the session tests (run as a script): resume a session, or die in the middle of a save."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys

import tierkv


def state_digest(cache) -> str | None:
    """SHA-256 of a cache's session state beyond K/V (None when it has none): equal digests, equal state."""
    state = cache.extra_state()
    if not state:
        return None
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def resume(session: str, model: str, text: str, max_new: int, tier: dict) -> None:
    """Load the session in this fresh process, count forward passes during the load, send one turn.
    tier: TierConfig settings of the LLM (JSON on the command line)."""
    llm = tierkv.load(model, device="cpu", dtype="fp32", **tier)
    calls = []
    forward = llm.model.forward
    llm.model.forward = lambda ids, *a, **k: (calls.append(int(ids.shape[0])), forward(ids, *a, **k))[1]
    chat = tierkv.Chat.load(session, llm, max_new_tokens=max_new)
    during_load = list(calls)
    digest = state_digest(chat.cache)
    reply = chat.send(text)
    kv = chat.cache.stats()
    print(json.dumps({"reply": reply, "forward_tokens_during_load": during_load, "restored": chat.restored,
                      "last_turn": chat.stats["last_turn"], "ids": chat.ids,
                      "kv": {k: kv.get(k) for k in ("cache", "sparse_steps", "tier_bytes")},
                      "state_digest": digest}))


def crash_save(session: str, model: str, kill_after: int) -> None:
    """Resume, add a turn, then save over the same directory and SIGKILL ourselves midway through the K/V."""
    llm = tierkv.load(model, device="cpu", dtype="fp32")
    chat = tierkv.Chat.load(session, llm, max_new_tokens=4)
    chat.send("one more turn")
    export, calls = chat.cache.export_kv, [0]

    def dying_export(*a, **k):
        calls[0] += 1
        if calls[0] > kill_after:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return export(*a, **k)

    chat.cache.export_kv = dying_export
    chat.save(session)
    print("save finished: the kill did not happen")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "resume":
        resume(args[0], args[1], args[2], int(args[3]), json.loads(args[4]) if len(args) > 4 else {})
    else:
        crash_save(args[0], args[1], int(args[2]))
