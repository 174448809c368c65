"""Qwen3, Gemma 3 and sliding windows on random-weight checkpoints: logits against transformers (fp32, 300 tokens,
past the 64-token windows), windows read from each config, chunked prefill and decode across a window boundary."""

from __future__ import annotations

import pytest
import torch

import tierkv
from tierkv.engine import eager_step, prefill
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.static import StaticKVCache
from tests.helpers import save_random_checkpoint

WINDOWS = {"qwen3": (), "gemma3": (64, None, 64), "mistral_window": (64, 64, 64), "qwen2_window": (None, 64, 64)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, smol_folder):
    tmp = tmp_path_factory.mktemp("arch")
    return {kind: save_random_checkpoint(tmp, kind, smol_folder) for kind in WINDOWS}


@pytest.fixture(scope="module")
def reference(folders, text_ids):
    """transformers' fp32 logits of the first 300 tokens, per kind (computed on first use)."""
    from transformers import AutoModelForCausalLM

    got = {}

    def logits(kind: str) -> torch.Tensor:
        if kind not in got:
            model = AutoModelForCausalLM.from_pretrained(str(folders[kind]), dtype=torch.float32).eval()
            with torch.no_grad():
                got[kind] = model(torch.tensor([text_ids[:300]])).logits[0].float()
        return got[kind]
    return logits


def _load(folder, **settings):
    return tierkv.load(str(folder), device="cpu", dtype="fp32", **settings)


def _prefill_logits(llm, cache, ids, chunk) -> torch.Tensor:
    with torch.no_grad():
        return prefill(llm.model, torch.tensor(ids), cache, chunk, all_logits=True)


@pytest.mark.parametrize("kind", list(WINDOWS))
def test_logits_match_transformers(kind, folders, reference, text_ids):
    folder = folders[kind]
    assert len(list(folder.glob("*.safetensors"))) > 1, "the test checkpoint should be sharded"
    llm = _load(folder)
    assert llm.cfg.layer_windows == WINDOWS[kind]
    ids, ref = text_ids[:300], reference(kind)
    diff = (_prefill_logits(llm, llm.new_cache(len(ids)), ids, 4096) - ref).abs().max().item()
    print(f"{kind}: max abs logit diff vs transformers {diff:.2e} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 1e-3
    assert ref.std() > 0.1  # the comparison is not between near-constant logits


def test_gemma3_sliding_layers_use_their_own_rope(folders):
    llm = _load(folders["gemma3"])
    m = llm.model
    assert llm.cfg.arch.qk_norm and llm.cfg.arch.sandwich_norms and llm.cfg.arch.activation == "gelu_tanh"
    assert m.layer_rope[1] is m.rope and m.layer_rope[0] is m.layer_rope[2] is m.sliding_rope
    assert llm.cfg.rope_theta == 1e6 and llm.cfg.sliding_rope_theta == 1e4
    m.rope.ensure(10_000)  # growing the full layers' table grows the sliding layers' with it
    assert m.sliding_rope.cos.shape[0] >= 10_000


@pytest.mark.parametrize("kind", ["mistral_window", "gemma3"])
def test_chunked_prefill_across_the_window_equals_one_shot(kind, folders, reference, text_ids):
    llm, ids = _load(folders[kind]), text_ids[:300]
    one = _prefill_logits(llm, llm.new_cache(len(ids)), ids, 4096)
    for chunk in (37, 100):  # slices that start inside and past the 64-token window
        chunked = _prefill_logits(llm, llm.new_cache(len(ids)), ids, chunk)
        diff, ref_diff = (chunked - one).abs().max().item(), (chunked - reference(kind)).abs().max().item()
        print(f"{kind} chunk {chunk}: max abs diff to one-shot {diff:.2e}, to transformers {ref_diff:.2e}")
        assert diff < 1e-4 and ref_diff < 1e-3


@pytest.mark.parametrize("cache_kind", [DenseKVCache, StaticKVCache])
def test_decode_past_the_window_matches_transformers(cache_kind, folders, reference, text_ids):
    """Token-by-token decode from position 40 to 160 (the window is 64) gives transformers' logits."""
    llm = _load(folders["gemma3"])
    c, ids = llm.cfg, text_ids[:160]
    cache = cache_kind(c.num_layers, c.num_kv_heads, c.head_dim, device="cpu", dtype=torch.float32,
                       capacity=len(ids), windows=c.layer_windows)
    rows = [_prefill_logits(llm, cache, ids[:40], 4096)[-1]]
    step = eager_step(llm.model, cache)
    with torch.no_grad():
        for pos in range(40, len(ids) - 1):
            rows.append(step(torch.tensor([ids[pos]]), pos)[-1])
    diff = (torch.stack(rows) - reference("gemma3")[39:len(ids) - 1]).abs().max().item()
    print(f"{cache_kind.__name__} decode vs transformers: max abs diff {diff:.2e}")
    assert diff < 1e-3
