"""Checks on user text before it reaches the tokenizer: strict UTF-8 files (naming the bad byte) and non-empty
prompts."""

from __future__ import annotations

from pathlib import Path

from tierkv.errors import ConfigError


def decode_utf8(data: bytes, what: str) -> str:
    """data as UTF-8 text; refuse other encodings, naming the offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          f"convert it, e.g. `iconv -f latin1 -t utf-8`") from None


def read_text_file(path: str | Path, what: str) -> str:
    """The UTF-8 text of a file (a FIFO such as bash's <(...) too); one-line errors for a missing, unreadable
    or non-UTF-8 file."""
    p = Path(path)
    label = f"{what} {str(path)!r}"
    if not p.exists():
        raise ConfigError(f"{label} does not exist; give a readable text file")
    if p.is_dir():
        raise ConfigError(f"{label} is a directory; give a readable text file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{label} cannot be read ({e.strerror}); give a readable text file") from None
    return decode_utf8(data, label)


def require_text(text: str | None, what: str) -> str:
    """text, refused when it is empty or only whitespace."""
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a string, not {type(text).__name__}")
    if not text.strip():
        raise ConfigError(f"{what} is empty{' (only whitespace)' if text else ''}; give some text")
    return text
