"""Passkey retrieval (bench/passkey_sweep.py): a random 5-digit key hidden at a depth of repetitive filler text,
asked for at the end; retrieved when the greedy reply contains it.

The question goes through the model's chat template where the tokenizer has one; a base model without one (the
Gemma 3 270M GGUF) gets a plain completion prompt ending "The pass key is". Each prompt is prefilled once and
replayed into a fresh cache per method (tierkv/bench/fidelity.py), so full and sparse see the same prefill.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from tierkv.bench.fidelity import PrefillSnapshot, greedy, method_cache, release
from tierkv.errors import ConfigError

INTRO = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. I will ask you for it.\n"
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key?"


def needle(key: int) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key. "


def prompt_ids(llm, key: int, depth: float, units: int) -> list[int]:
    """Token ids of the prompt: INTRO, `units` filler sentences with the key after round(depth * units) of them,
    the question; through the chat template when the tokenizer has one."""
    at = round(depth * units)
    body = INTRO + FILLER * at + needle(key) + FILLER * (units - at) + QUESTION
    if getattr(llm.tokenizer, "chat_template", None):
        return llm.encode(messages=[{"role": "user", "content": body + " Answer with the number only."}])
    return list(llm.tokenizer(body + " The pass key is")["input_ids"])  # BOS where the tokenizer adds one


def units_for(llm, length: int) -> int:
    """Filler sentences that bring the prompt to about `length` tokens."""
    base = len(prompt_ids(llm, 10000, 0.5, 0))
    per_unit = (len(prompt_ids(llm, 10000, 0.5, 20)) - base) / 20
    if length < base + per_unit:
        raise ConfigError(f"passkey length {length} is too short: the prompt alone takes {base} tokens")
    return int((length - base) / per_unit)


def sweep_rows(llm, lengths: Sequence[int], depths: Sequence[float], methods: Sequence[str] = ("full", "sparse"),
               seed: int = 0, max_new: int = 12, log=None) -> list[dict]:
    """Per length and depth one prompt (a fresh random key) and per method one greedy reply: rows with the
    key, the prompt's tokens, the reply and `retrieved`; a method the factory refuses gets its error instead."""
    rng = random.Random(seed)
    rows = []
    for length in lengths:
        if length + max_new > llm.context_size:
            raise ConfigError(f"passkey length {length} + {max_new} new tokens exceeds the model's context of "
                              f"{llm.context_size}; use a shorter length")
        units = units_for(llm, length)
        for depth in depths:
            key = rng.randint(10000, 99999)
            ids = prompt_ids(llm, key, depth, units)
            snap = PrefillSnapshot(llm, torch.tensor(ids, dtype=torch.long, device=llm.device))
            for method in methods:
                row = {"length": length, "depth": depth, "method": method, "key": key, "tokens": len(ids)}
                try:
                    cache = method_cache(llm, method, llm.tier, len(ids) + max_new + 1)
                except ConfigError as exc:  # e.g. the sparse cache refusing a sliding-window model: recorded
                    row["error"] = str(exc)
                else:
                    try:
                        snap.replay(cache)
                        reply = llm.tokenizer.decode(greedy(llm, cache, snap.first, max_new), skip_special_tokens=True)
                    finally:
                        release(llm, cache)
                    row.update(reply=reply, retrieved=str(key) in reply)
                rows.append(row)
                if log:
                    log(row)
            snap.close()
    return rows
