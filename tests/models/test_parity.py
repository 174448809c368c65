"""Our forward against transformers' on the same weights, and cache/no-cache/chunked consistency."""

from __future__ import annotations

import pytest

import tierkv
from tests.helpers import hf_logits, our_logits, save_random_checkpoint


def test_smollm2_logits_match_transformers(smol, smol_folder, text_ids, device):
    ids = text_ids[:300]
    llm = smol if device == "cpu" else tierkv.load(str(smol_folder), device=device, dtype="fp32")
    diff = (our_logits(llm, ids) - hf_logits(smol_folder, ids, device)).abs().max().item()
    print(f"SmolLM2 fp32 on {device}: max abs logit diff vs transformers {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("kind", ["llama31", "qwen2", "mistral"])
def test_random_checkpoints_match_transformers(kind, tmp_path, smol_folder, text_ids, device):
    folder = save_random_checkpoint(tmp_path, kind, smol_folder)
    assert len(list(folder.glob("*.safetensors"))) > 1, "the test checkpoint should be sharded"
    assert (folder / "model.safetensors.index.json").is_file()
    llm = tierkv.load(str(folder), device=device, dtype="fp32")
    ids = text_ids[:200]  # beyond llama31's original 64-position window, so the llama3 scaling matters
    ours, ref = our_logits(llm, ids), hf_logits(folder, ids, device)
    diff = (ours - ref).abs().max().item()
    print(f"{kind} on {device}: max abs logit diff {diff:.2e} (logit scale {ref.abs().max().item():.2f})")
    assert diff < 1e-3
    assert ref.std() > 0.1  # the comparison is not between near-constant logits


def test_chunked_prefill_matches_one_shot(smol, text_ids):
    ids = text_ids[:300]
    one = our_logits(smol, ids, chunk=4096)
    for chunk in (64, 97):
        diff = (our_logits(smol, ids, chunk=chunk) - one).abs().max().item()
        print(f"chunk {chunk}: max abs diff {diff:.2e}")
        assert diff < 1e-4


def test_greedy_with_cache_equals_recompute(smol, text_ids):
    prompt = text_ids[:120]
    with_cache = list(smol.stream_ids(prompt, max_new_tokens=32))
    ids = list(prompt)
    for _ in range(32):
        ids.append(int(our_logits(smol, ids)[-1].argmax()))
    assert with_cache == ids[len(prompt):]
