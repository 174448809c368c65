"""The fidelity benches' machinery on the real SmolLM2 (CPU, fp32): a replayed prefill scores exactly as
`llm.score`'s own prefill, and bench/passkey_sweep.py retrieves a passkey at 1.5K tokens with full attention."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tierkv.bench.fidelity import PrefillSnapshot, method_cache, release, teacher_forced
from tierkv.llm import LLM

ROOT = Path(__file__).resolve().parents[2]
CONTEXT, STEPS = 1100, 24


@pytest.mark.parametrize("attention", ["full", "sparse"])
def test_replayed_prefill_scores_as_llm_score(smol, text_ids, one_thread, attention):
    # 16-token chunks, 16 sinks and a 32-token window leave picks at 1/8 of 1.1K (the fraction alone: no 2,048-token
    # floor); 512-token slices: three of them
    tier = smol.tier.replace(attention=attention, token_budget=0.125, budget_floor_tokens=0, chunk_size=16,
                             sink_tokens=16, window_tokens=32, prefill_chunk=512)
    llm = LLM(smol.model, smol.tokenizer, tier, smol.source)
    ids = text_ids[:CONTEXT + STEPS]
    want = llm.score(ids, CONTEXT)
    x = torch.tensor(ids)
    snap = PrefillSnapshot(llm, x[:CONTEXT])
    cache = method_cache(llm, attention, tier, len(ids) + 1)
    try:
        snap.replay(cache)
        got = teacher_forced(llm, cache, x, snap.first)
        if attention == "sparse":
            assert cache.stats()["sparse_steps"] == STEPS - 1
    finally:
        release(llm, cache)
    assert got.shape == want.shape == (STEPS, smol.cfg.vocab_size)
    assert (got - want).abs().max().item() < 1e-5


@pytest.mark.slow  # a subprocess loads the model and prefills three 1.5K prompts
def test_passkey_sweep_retrieves_with_full_attention(tmp_path):
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "passkey.json", tmp_path / "passkey.png"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "passkey_sweep.py"), "--model", "smollm2",
                        "--lengths", "1536", "--depths", "0.1,0.5,0.9", "--threads", "1", "--out", str(out),
                        "--plot", str(png)], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert json.loads(r.stdout.strip().splitlines()[-1]) == doc
    assert doc["prompt"] == "chat" and list(doc)[-3:] == ["device", "date", "command"]
    full = [row for row in doc["rows"] if row["method"] == "full"]
    assert [row["depth"] for row in full] == [0.1, 0.5, 0.9]
    assert all(1500 <= row["tokens"] <= 1536 for row in full)
    assert all(row["retrieved"] and str(row["key"]) in row["reply"] for row in full), full
    assert len({row["key"] for row in full}) == 3  # a fresh key per depth
    sparse = [row for row in doc["rows"] if row["method"] == "sparse"]
    assert len(sparse) == 3 and all(isinstance(row["retrieved"], bool) for row in sparse)
    assert doc["retrieved"]["full"] == "3/3"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
