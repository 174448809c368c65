"""Model resolution: default model, GGUF cache reuse, bad folders and architectures, configs and RoPE."""

from __future__ import annotations

import json

import pytest

import tierkv
from tierkv.errors import ModelNotFoundError, UnsupportedModelError
from tierkv.models.config import ModelConfig
from tierkv.models.weights import default_model_path, resolve_model


def test_default_model_is_the_smollm2_gguf():
    path = default_model_path()
    assert path.suffix == ".gguf" and "SmolLM2" in path.name


def test_gguf_conversion_is_cached(smol_folder):
    again = resolve_model(default_model_path())
    assert again == smol_folder
    assert (again / "model.safetensors").stat().st_size > 100_000_000
    assert json.loads((again / "config.json").read_text())["model_type"] == "llama"


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelNotFoundError, match="not a model folder"):
        resolve_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(ModelNotFoundError, match="no .safetensors"):
        resolve_model(tmp_path)


def test_unsupported_architecture_is_named():
    class Hf:
        model_type = "gpt2"
        architectures = ["GPT2LMHeadModel"]

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        ModelConfig.from_hf(Hf())


def test_shape_model_generates_on_cpu():
    llm = tierkv.load("llama-tiny", device="cpu")
    out = list(llm.stream_ids([1, 2, 3], max_new_tokens=5))
    assert len(out) == 5 and all(0 <= t < llm.cfg.vocab_size for t in out)


def test_sampling_is_seeded(smol):
    a = smol.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = smol.generate("Once upon a time", max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a == b and len(a) > 0
