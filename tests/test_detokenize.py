"""Streamed text equals one decode of all ids, on real tokenizers and random ids (incomplete UTF-8 included)."""

import random

import pytest

from tierkv.detokenize import TextStream


def _stream(tok, ids):
    s = TextStream(tok)
    pieces = [s.feed(t) for t in ids]
    pieces.append(s.finish())
    return pieces, s.text


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_stream_to_the_whole_decode(smol, seed):
    tok = smol.tokenizer
    rng = random.Random(seed)
    ids = [rng.randrange(len(tok)) for _ in range(300)]
    pieces, text = _stream(tok, ids)
    assert "".join(pieces) == text == tok.decode(ids, skip_special_tokens=True)
    assert not any(p.endswith("\ufffd") for p in pieces[:-1])  # incomplete UTF-8 is held back until finish


def test_real_text_streams_token_by_token(smol, text_ids):
    tok = smol.tokenizer
    ids = list(text_ids[:500])
    pieces, text = _stream(tok, ids)
    assert text == tok.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) > 400  # real text comes out about one piece per token


def test_multibyte_characters_wait_for_their_last_byte(smol):
    tok = smol.tokenizer
    ids = tok("naïve café 東京 🙂", add_special_tokens=False)["input_ids"]
    pieces, text = _stream(tok, ids)
    assert "".join(pieces) == text == "naïve café 東京 🙂"
    assert "\ufffd" not in "".join(pieces)
