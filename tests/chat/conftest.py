"""A three-turn SmolLM2 conversation run once: per-turn stats, replies, and a save taken after turn 2."""

from __future__ import annotations

import pytest

from tests.chat.helpers import CONTEXT, MAX_NEW, SYSTEM, TURNS
from tierkv.chat_template import render


@pytest.fixture(scope="session")
def convo(smol, tmp_path_factory):
    """Run TURNS in one session; save after turn 2. Returns a dict of what each turn did."""
    save_dir = tmp_path_factory.mktemp("convo") / "after2"
    chat = smol.chat(system=SYSTEM, context=CONTEXT, max_new_tokens=MAX_NEW)
    out = {"prefix": chat.prefix_len, "turns": [], "save": save_dir}
    for i, text in enumerate(TURNS):
        before = list(chat.ids)
        prompt = render(smol, [*chat.history, {"role": "user", "content": text}], add_generation_prompt=True)
        reply = chat.send(text)
        out["turns"].append({"cached_before": before, "prompt": prompt, "reply": reply,
                             "stats": dict(chat.stats["last_turn"]), "history": chat.history})
        if i == 1:
            chat.save(save_dir)
            out["saved_ids"] = list(chat.ids)
    chat.close()
    return out
