"""Sliding-window layers in rings, full-attention layers alone in the tiered or sparse cache (kv/caches/window_split.py).

The rings against the dense cache with windows, slice by slice and layer after layer; then random-weight Gemma 3
(window, full, window) and Mistral (a window on every layer) models: greedy tokens through the sparse cache with a
budget past the context and through small tiers with a disk equal the dense cache's, a chat saved mid-way and
resumed equals the uninterrupted one, and only the full-attention layers' K/V are in the tiers.
"""

from __future__ import annotations

import json

import pytest
import torch

import tierkv
from tierkv.errors import BudgetError
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.base import copy_state
from tierkv.kv.caches.window_ring import ROLLBACK_ROOM, WindowRings, rings_nbytes
from tierkv.kv.caches.window_split import WindowSplitKVCache
from tests.helpers import save_random_checkpoint

HKV, D = 2, 8


def _kv(g, n):
    return torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g)


def test_rings_attend_as_the_dense_cache_across_wraps_and_slices():
    """Slices of every size (one token, longer than the ring) and layer-major appends give the dense cache's
    outputs; the ring keeps window + ROLLBACK_ROOM positions."""
    windows = (16, 40)
    g = torch.Generator().manual_seed(0)
    dense = DenseKVCache(2, HKV, D, device="cpu", dtype=torch.float32, windows=windows)
    rings = WindowRings(windows, HKV, D, device=torch.device("cpu"), dtype=torch.float32,
                        pos=torch.zeros(1, dtype=torch.long), room=8)
    assert rings.capacity == 48
    pos = 0
    for t in (5, 1, 1, 70, 3, 1, 1, 1, 120, 1):
        for r in range(2):
            k, v = _kv(g, t)
            q = torch.randn(t, 2 * HKV, D, generator=g)
            dense.append(r, k, v)
            rings.append(r, k, v)
            want, got = dense.attend(r, q), rings.attend(r, q)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        dense.advance(t)
        rings.advance(t)
        rings.pos.add_(t)
        pos += t
    # layer after layer (a layer-major prefill): each ring takes its slices before the next ring starts
    qs = {}
    for r in range(2):
        for t in (30, 1, 9):
            k, v = _kv(g, t)
            qs.setdefault(r, []).append((k, v, torch.randn(t, 2 * HKV, D, generator=g)))
            rings.append(r, k, v)
            qs[r][-1] += (rings.attend(r, qs[r][-1][2]),)
    for i in range(3):
        for r in range(2):
            k, v, q, got = qs[r][i]
            dense.append(r, k, v)
            torch.testing.assert_close(got, dense.attend(r, q), rtol=1e-5, atol=1e-5)
        dense.advance(k.shape[0])
    rings.advance(40)
    n = pos + 40
    assert rings.first == [n - 48, n - 48]
    torch.testing.assert_close(rings.export(1, n - 48, n), dense.export_kv(1, n - 48, n))


def test_rings_roll_back_only_within_what_they_hold():
    rings = WindowRings((16,), HKV, D, device=torch.device("cpu"), dtype=torch.float32,
                        pos=torch.zeros(1, dtype=torch.long), room=8)  # holds 24 positions
    g = torch.Generator().manual_seed(1)
    rings.append(0, *_kv(g, 100))
    rings.advance(100)  # holds [76, 100): a query at n reads [n - 15, n)
    assert rings.can_truncate(100) and rings.can_truncate(91) and not rings.can_truncate(90)
    assert rings.can_truncate(0)
    with pytest.raises(ValueError, match="keep the last 24 positions"):
        rings.truncate(90)
    rings.truncate(95)
    assert rings.seq_len == 95 and rings.can_truncate(91)
    with pytest.raises(ValueError, match=r"outside the positions \[76, 95\)"):
        rings.export(0, 70, 95)


def test_only_windows_shorter_than_the_context_get_rings():
    """A window as long as the context never drops a key: that layer goes to the tiers with the full ones."""
    from dataclasses import replace

    from tierkv.config import TierConfig
    from tierkv.kv.factory import CacheRequest, build_cache
    from tierkv.models.shapes import shape_config

    base = shape_config("llama-tiny")  # 2 layers, context 1 << 20
    for windows, rings, inner in (((64, None), [0], 1), ((1 << 20, None), None, 2), ((64, 1 << 21), [0], 1)):
        cfg = replace(base, layer_windows=windows)
        req = CacheRequest(TierConfig(cpu_budget=1 << 22), cfg, torch.device("cpu"), torch.float32, False, "chat", 64)
        cache, choice = build_cache(req, None)
        assert choice.kind == "tiered"
        if rings is None:
            assert not isinstance(cache, WindowSplitKVCache) and cache.num_layers == 2
        else:
            assert sorted(cache.ring_of) == rings and cache.inner.num_layers == inner
        assert cfg.full_attention_layers == inner
        cache.close()


# ---- random-weight models ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_folder):
    tmp = tmp_path_factory.mktemp("windows")
    return {kind: save_random_checkpoint(tmp, kind, smol_folder) for kind in ("gemma3", "mistral_window", "gemma3_d256")}


def _load(folder, **settings):
    return tierkv.load(str(folder), device="cpu", dtype="fp32", **settings)


def _greedy(llm, ids, n=40) -> list[int]:
    llm.stop_ids = set()
    out = list(llm.stream_ids(ids, max_new_tokens=n))
    llm.close()
    return out


def _tiered_settings(llm, tmp_path) -> dict:
    """A kv_gpu_budget that holds the rings and a few chunks, a host budget of a few chunks, a disk."""
    c = llm.cfg
    sliding = tuple(w for w in c.layer_windows if w is not None)
    chunk = 2 * 32 * c.num_kv_heads * c.head_dim * 4  # 32 tokens' K and V: budgets in tokens, whatever the chunk size
    return {"kv_gpu_budget": rings_nbytes(sliding, c.num_kv_heads, c.head_dim, torch.float32) + 12 * chunk,
            "cpu_budget": 3 * chunk, "disk_dir": str(tmp_path)}


@pytest.mark.parametrize("kind", ["gemma3", "mistral_window"])
def test_greedy_tokens_equal_the_dense_cache(kind, folders, text_ids, tmp_path):
    """400 prompt tokens (past the window and the rings' room) and 40 new: sparse with a budget past the context and
    tiered with a disk tier give the dense cache's tokens; only the full-attention layers are in the tiers."""
    ids = text_ids[:400]
    want = _greedy(_load(folders[kind]), ids)
    sparse = _load(folders[kind], attention="sparse", token_budget=4096, prefill_chunk=128)
    assert _greedy(sparse, ids) == want
    kv = sparse.stats["kv"]
    full = [i for i, w in enumerate(sparse.cfg.layer_windows) if w is None]
    assert kv["window"]["inner_layers"] == full and kv["window"]["capacity"] == 64 + ROLLBACK_ROOM
    assert kv["cache"] == ("sparse" if full else "window") and "rings on the device" in kv["path"]["reason"]
    tiered = _load(folders[kind], prefill_chunk=96, **_tiered_settings(_load(folders[kind]), tmp_path))
    assert _greedy(tiered, ids) == want
    kv = tiered.stats["kv"]
    if full:  # one full layer of three: the tiers hold its 440 positions, no more
        c = tiered.cfg
        per_token = 2 * c.num_kv_heads * c.head_dim * 4
        assert kv["cache"] == "tiered" and kv["mode"] == "full"
        assert sum(kv["chunks"].values()) == (len(ids) + 39) // tiered.tier.chunk_size  # sealed chunks of one layer
        assert kv["bytes"]["disk"] > 0
        rings = 2 * (64 + ROLLBACK_ROOM) * per_token  # the tiered cache's device budget is what the rings leave
        cache = tiered.new_cache(64)
        assert cache.inner.config.kv_gpu_budget == _tiered_settings(tiered, tmp_path)["kv_gpu_budget"] - rings
        assert cache.inner.num_layers == 1 and cache.rings.nbytes == rings
        tiered.close()


def test_a_budget_below_the_rings_is_refused(folders):
    llm = _load(folders["gemma3"], kv_gpu_budget=4096, cpu_budget=1 << 20)
    with pytest.raises(BudgetError, match="cannot hold the sliding-window layers' rings"):
        llm.generate("hello", max_new_tokens=2)


def test_sparse_decode_with_selection_runs_with_rings(folders, text_ids):
    """A budget below the context: the full layer selects, the sliding layers read their rings (each decode step
    their 64-token windows, counted as HBM traffic). Random weights attend flatly, so top-1 agreement with dense is
    only printed (a random model without windows agrees less: 5% for Mistral's shape)."""
    llm = _load(folders["gemma3"], attention="sparse", token_budget=96, sink_tokens=16, window_tokens=32,
                chunk_size=16, prefill_chunk=128)
    ids = text_ids[:500]
    got, want = llm.score(ids, 300), _load(folders["gemma3"]).score(ids, 300)
    kv = llm.last_stats.extra["kv"]
    assert kv["sparse_steps"] > 0 and torch.isfinite(got).all()
    c = llm.cfg
    per_step = 2 * 64 * 2 * c.num_kv_heads * c.head_dim * 4  # two sliding layers, K and V of 64 positions
    assert kv["window"]["decode_read_bytes"] == (len(ids) - 1 - 300) * per_step
    assert kv["total"]["bytes_moved"]["kv_hbm"] == kv["window"]["decode_read_bytes"]
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"top-1 agreement with dense at a 96-token budget (random weights): {agree:.3f}")


@pytest.mark.parametrize("settings", [{"attention": "sparse", "token_budget": 4096}, "tiered"])
def test_chat_saved_and_resumed_equals_the_uninterrupted_one(settings, folders, text_ids, smol, tmp_path):
    """A context past the rings, two turns, a save, a third turn: the resumed chat replies as the one that ran on;
    the session keeps each sliding layer's ring only and records where each layer file starts."""
    folder = folders["gemma3"]
    if settings == "tiered":
        settings = _tiered_settings(_load(folder), tmp_path / "disk")
    context = smol.tokenizer.decode(text_ids[1000:1400])
    turns = ["What is this about?", "Say more.", "And then?"]
    llm = _load(folder, **settings)
    chat = llm.chat(context=context, max_new_tokens=16)
    for text in turns[:2]:
        chat.send(text)
    chat.save(tmp_path / "s")
    saved_len = chat.cache.seq_len
    on = chat.send(turns[2])
    ids_on = list(chat.ids)
    chat.close()

    doc = json.loads((tmp_path / "s" / "session.json").read_bytes())
    files = doc["body"]["kv"]["files"]
    assert doc["format_version"] == 2 and saved_len > 64 + ROLLBACK_ROOM
    assert [f["start"] for f in files] == [saved_len - 64 - ROLLBACK_ROOM, 0, saved_len - 64 - ROLLBACK_ROOM]
    assert files[0]["bytes"] * saved_len == files[1]["bytes"] * (64 + ROLLBACK_ROOM)

    resumed = tierkv.chat.Chat.load(tmp_path / "s", llm, max_new_tokens=16)
    assert resumed.send(turns[2]) == on and resumed.ids == ids_on
    resumed.close()


def test_a_chat_rolls_back_past_the_rings_by_prefilling_again(folders, text_ids, smol):
    """reset() keeps the context prefix; the rings no longer hold what its end reads, so the next turn prefills
    from the start and replies as a fresh chat does."""
    llm = _load(folders["gemma3"], attention="sparse", token_budget=4096)
    context = smol.tokenizer.decode(text_ids[1000:1100])
    chat = llm.chat(context=context, max_new_tokens=16)
    chat.send("What is this about? " * 100)  # pushes the prefix's end out of the rings
    chat.reset()
    again = chat.send("Say more.")
    assert chat.last_turn.reused == 0
    fresh = llm.chat(context=context, max_new_tokens=16)
    assert again == fresh.send("Say more.")


def test_copy_state_moves_only_the_rings(folders, text_ids):
    """Growing into a larger cache (kv/cache.copy_state) copies each ring's positions, not the whole context."""
    llm = _load(folders["gemma3"], attention="sparse", token_budget=4096)
    a, b = llm.new_cache(1024), llm.new_cache(2048)
    assert isinstance(a, WindowSplitKVCache)
    from tierkv.engine import prefill
    with torch.no_grad():
        prefill(llm.model, torch.tensor(text_ids[:500]), a, 128)
    copy_state(a, b)
    assert b.seq_len == 500 and b.export_start(0) == 500 - 64 - ROLLBACK_ROOM and b.export_start(1) == 0
    for layer in range(3):
        s = a.export_start(layer)
        assert torch.equal(a.export_kv(layer, s, 500), b.export_kv(layer, s, 500))
    llm.close()


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["gemma3", "mistral_window", "gemma3_d256"])
def test_captured_decode_with_rings_equals_the_static_cache_on_cuda(kind, folders, text_ids):
    """On CUDA the sparse decode step, rings included, replays one captured graph: 48 greedy tokens after 400 prompt
    tokens (the rings wrap) equal the static cache's, in fp32. gemma3_d256: head dim 256 in fp32, where no shadow
    kernel block fits Hopper's shared memory and the captured step runs the torch reference."""
    ids = text_ids[:400]

    def run(**settings):
        llm = tierkv.load(str(folders[kind]), device="cuda", dtype="fp32", **settings)
        llm.stop_ids = set()
        out = list(llm.stream_ids(ids, max_new_tokens=48))
        return out, llm.stats["kv"]

    want, ref = run()
    got, kv = run(attention="sparse", token_budget=4096, prefill_chunk=128)
    assert ref["path"]["kind"] == "static" and kv["path"]["captured"]
    assert got == want
