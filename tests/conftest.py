"""Shared fixtures: the real SmolLM2 model on the CPU and factories for tiny random-weight checkpoints."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for the parity tests (cpu or cuda); default cpu")


@pytest.fixture(scope="session")
def device(request) -> str:
    """Where the parity tests run our forward and transformers' (`pytest --device cuda` on a GPU machine)."""
    return request.config.getoption("--device")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core runner a second one thrashes (measured 7x slower decode, 200x per
    call on tiny tensors)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smol_folder() -> Path:
    """The default model converted to a safetensors folder (GGUF converted once, cached)."""
    from tierkv.models.weights import default_model_path, resolve_model

    return resolve_model(default_model_path())


@pytest.fixture(scope="session")
def smol(smol_folder):
    """SmolLM2-135M-Instruct in fp32 on the CPU, loaded once."""
    import tierkv

    return tierkv.load(str(smol_folder), device="cpu", dtype="fp32")


@pytest.fixture(scope="session")
def text_ids(smol):
    """Real English text (pydoc topics, shipped with Python) as SmolLM2 token ids."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return smol.tokenizer(text, add_special_tokens=False)["input_ids"]


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
    elif kind == "gemma3":
        cfg = tf.Gemma3TextConfig(**{**common, "tie_word_embeddings": True}, head_dim=16, query_pre_attn_scalar=24,
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
