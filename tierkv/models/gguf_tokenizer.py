"""The tokenizer of a Gemma-family GGUF, built here rather than by transformers' GGUF converter.

A Gemma GGUF (`tokenizer.ggml.model` "llama") lists a SentencePiece BPE vocabulary without merges, and its
scores do not follow the merge order: the order of the tokens in the file does. transformers 5.17 makes a Unigram
model of it, which its own GemmaTokenizer replaces on load with a BPE that has no merges: text came out one
character per token and without BOS (seen on the device machine on 2026-12-06, where a 32K Gemma 3 run read
characters). Later releases rebuild the merges. Building them here gives every supported transformers the same
tokenizer.

The merges are every split of a token into two tokens of the vocabulary, best first: by the token's place in the
file, then the longer left piece first. Tokens of spaces only are respelled with U+2581, as GemmaTokenizer looks
them up. Control tokens (type 3) are added whole as special tokens, user-defined ones (type 4) as plain tokens.
"""

from __future__ import annotations

from pathlib import Path

GEMMA_ARCHITECTURES = ("gemma", "gemma2", "gemma3")
# of the tokenizer files a GGUF conversion writes (tierkv/models/weights.py): a cached conversion stamped with an
# older version (or none) gets its tokenizer rebuilt
TOKENIZER_VERSION = 2
CONTROL, USER_DEFINED = 3, 4


def _field(reader, name: str, default=None):
    f = reader.fields.get(name)
    return default if f is None else f.contents()


def read(gguf: Path):
    """The file's metadata (a gguf.GGUFReader: parsing a 262K-token vocabulary takes seconds, so read once)."""
    from gguf import GGUFReader

    return GGUFReader(str(gguf))


def builds_own_tokenizer(r) -> bool:
    """Whether the GGUF read as `r` is a Gemma-family file whose merges tierkv rebuilds (a "llama" vocabulary
    with no merges)."""
    return (_field(r, "general.architecture") in GEMMA_ARCHITECTURES and _field(r, "tokenizer.ggml.model") == "llama"
            and "tokenizer.ggml.merges" not in r.fields)


def bpe_merges(tokens: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of a SentencePiece BPE vocabulary listed in merge order. A spelling listed twice keeps its
    last id, and ranks by it."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = []
    for t in sorted(vocab, key=vocab.__getitem__):
        merges += [(t[:i], t[i:]) for i in range(len(t) - 1, 0, -1) if t[:i] in vocab and t[i:] in vocab]
    return vocab, merges


def respell(token: str) -> str:
    """A token of spaces only as GemmaTokenizer spells it (one U+2581 per space)."""
    return "\u2581" * len(token) if " " in token and not token.strip() else token


def gemma_tokenizer(r):
    """A transformers GemmaTokenizer for the Gemma-family GGUF read as `r` (see the module docstring)."""
    from tokenizers import AddedToken
    from transformers import GemmaTokenizer

    tokens = [respell(t) for t in _field(r, "tokenizer.ggml.tokens")]
    types = list(_field(r, "tokenizer.ggml.token_type", []))
    vocab, merges = bpe_merges(tokens)

    def token(key: str, default: str) -> str:
        at = _field(r, f"tokenizer.ggml.{key}")
        return tokens[at] if at is not None else default

    tok = GemmaTokenizer(vocab=vocab, merges=merges, unk_token=token("unknown_token_id", "<unk>"),
                         bos_token=token("bos_token_id", "<bos>"), eos_token=token("eos_token_id", "<eos>"),
                         pad_token=token("padding_token_id", "<pad>"),
                         add_bos_token=bool(_field(r, "tokenizer.ggml.add_bos_token", True)),
                         add_eos_token=bool(_field(r, "tokenizer.ggml.add_eos_token", False)))
    control = [AddedToken(t, normalized=False, special=True) for t, k in zip(tokens, types) if k == CONTROL]
    tok.add_tokens(control, special_tokens=True)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    template = _field(r, "tokenizer.chat_template")
    if template:
        tok.chat_template = template
    return tok
