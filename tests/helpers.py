"""Helpers shared by tests (and bench/parity.py) that are not fixtures: tiny random-weight checkpoints and logits
from our forward and from transformers'. Tests import these; no test imports another test or a conftest
(tests/test_layering.py checks)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from tierkv.engine import prefill


def save_random_checkpoint(tmp: Path, kind: str, smol_folder: Path, *, max_positions: int = 4096) -> Path:
    """Save a tiny random-weight model of `kind` as a sharded safetensors folder.

    Kinds: llama31, qwen2, mistral; qwen3 (qk-norm); gemma3 (sliding layers 0 and 2 with a 64-token window and RoPE
    base 10K, a full layer with base 1M and linear scaling, query_pre_attn_scalar != head_dim); mistral_window (a
    64-token window on every layer); qwen2_window (use_sliding_window, 64 tokens, max_window_layers=1).
    """
    import transformers as tf

    common = dict(vocab_size=49152, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                  rms_norm_eps=1e-5, tie_word_embeddings=False)
    default_rope = {"rope_type": "default", "rope_theta": 10000.0}
    if kind == "llama31":
        cfg = tf.LlamaConfig(**common, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
        model_cls = tf.LlamaForCausalLM
    elif kind in ("qwen2", "qwen2_window"):
        window = dict(use_sliding_window=True, sliding_window=64, max_window_layers=1) if kind == "qwen2_window" else {}
        cfg = tf.Qwen2Config(**common, **window, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model_cls = tf.Qwen2ForCausalLM
    elif kind in ("mistral", "mistral_window"):
        cfg = tf.MistralConfig(**common, sliding_window=64 if kind == "mistral_window" else None,
                               rope_parameters=default_rope)
        model_cls = tf.MistralForCausalLM
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(**common, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        model_cls = tf.Qwen3ForCausalLM
    elif kind in ("gemma3", "gemma3_d256"):
        # gemma3_d256: Gemma 3 270M's attention shape (4 query heads, 1 KV head of 256), where the split-K kernels
        # run out of shared memory at 64 keys a block on Hopper
        heads = dict(num_attention_heads=4, num_key_value_heads=1, head_dim=256) if kind == "gemma3_d256" else \
            dict(head_dim=16)
        cfg = tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True, **heads}, query_pre_attn_scalar=24,
                                  sliding_window=64, layer_types=["sliding_attention", "full_attention",
                                                                  "sliding_attention"],
                                  rope_parameters={"sliding_attention": default_rope, "full_attention": {
                                      "rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0}})
        model_cls = tf.Gemma3ForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(0)
    model = model_cls(cfg).float().eval()
    with torch.no_grad():  # larger weights than the default init, so differences show in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15 if p.dim() == 2 else 0.5)
    out = tmp / kind
    model.save_pretrained(out, max_shard_size="2MB")
    for f in smol_folder.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")) or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out


def hf_logits(folder, ids, device="cpu") -> torch.Tensor:
    """transformers' fp32 logits (T, vocab) of ids for the checkpoint in folder, on the CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        return model(torch.tensor([ids], device=device)).logits[0].float().cpu()


def our_logits(llm, ids, chunk=4096) -> torch.Tensor:
    """Our logits (T, vocab) of ids, prefilled in chunks of `chunk` into a fresh cache, on the CPU."""
    cache = llm.new_cache(len(ids))
    with torch.no_grad():
        out = prefill(llm.model, torch.tensor(ids, device=llm.device), cache, chunk, all_logits=True)
    cache.close()
    return out.cpu()
