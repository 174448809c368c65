"""Models by name: shapes, the default model's name, a Hugging Face id in the local cache, and the rule that a
lone positional argument of `tierkv run` is a model only when it names one."""

from __future__ import annotations

import shutil

import pytest

import tierkv
from tierkv.cli.run import split_model_and_prompt
from tierkv.errors import ConfigError, ModelNotFoundError
from tierkv.models.names import find_model, hf_snapshot, local_model


@pytest.fixture
def hf_cache(tmp_path, monkeypatch, smol_folder):
    """A Hugging Face hub cache laid out as huggingface_hub writes it, holding a tiny random llama."""
    from tests.helpers import save_random_checkpoint

    hub = tmp_path / "hub"
    snap = hub / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    snap.parent.mkdir(parents=True)
    shutil.move(save_random_checkpoint(tmp_path, "llama31", smol_folder, max_positions=256), snap)
    (hub / "models--acme--tiny-llama" / "refs").mkdir()
    (hub / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    return snap


def test_hf_id_in_the_local_cache_loads(hf_cache):
    assert hf_snapshot("acme/tiny-llama") == hf_cache and local_model("acme/tiny-llama") == str(hf_cache)
    llm = tierkv.load("acme/tiny-llama", device="cpu")
    assert llm.cfg.hidden_size == 64 and llm.context_size == 256


def test_hf_id_not_in_the_cache_is_named(hf_cache):
    assert local_model("acme/other") is None
    with pytest.raises(ModelNotFoundError, match="'acme/other' is neither a path nor in the Hugging Face cache"):
        find_model("acme/other")


def test_default_model_names():
    assert find_model("smollm2") is None and find_model("SmolLM2-135M-Instruct") is None  # None: the default
    assert find_model("llama-tiny") == "llama-tiny" and find_model(None) is None


@pytest.mark.parametrize("args, model, prompt", [
    (("What is 1/2 + 1/3?",), None, "What is 1/2 + 1/3?"),
    (("llama-tiny",), "llama-tiny", None),
    (("smollm2",), "smollm2", None),
    (("acme/tiny-llama",), "acme/tiny-llama", None),
    (("acme/not-here",), None, "acme/not-here"),
    (("some.gguf",), None, "some.gguf"),
    (("llama-tiny", "hi"), "llama-tiny", "hi"),
    ((), None, None),
])
def test_a_lone_positional_is_a_model_only_when_it_names_one(hf_cache, args, model, prompt):
    assert split_model_and_prompt(args, None, False) == (model, prompt)


def test_with_m_the_positional_is_the_prompt_and_with_p_the_model(hf_cache):
    assert split_model_and_prompt(("llama-tiny",), "acme/tiny-llama", False) == ("acme/tiny-llama", "llama-tiny")
    assert split_model_and_prompt(("What now?",), None, True) == ("What now?", None)  # -p given: MODEL only
    with pytest.raises(ConfigError, match="the prompt is given twice"):
        split_model_and_prompt(("llama-tiny", "hi"), None, True)


def test_an_existing_model_folder_or_gguf_is_a_model_and_other_paths_are_prompts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "notes").mkdir()
    (tmp_path / "hello").write_text("a file that happens to share the prompt's name")
    assert split_model_and_prompt(("model",), None, False) == ("model", None)
    assert split_model_and_prompt(("m.gguf",), None, False) == ("m.gguf", None)
    assert split_model_and_prompt(("notes",), None, False) == (None, "notes")
    assert split_model_and_prompt(("hello",), None, False) == (None, "hello")
