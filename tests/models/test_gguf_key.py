"""GGUF conversions are keyed by file content: copies share a key, other content gets another, and the digest is
remembered so an unchanged file is not hashed again."""

from __future__ import annotations

import os

from tierkv.models.weights import gguf_content_key


def test_copies_share_a_key_and_other_content_does_not(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path / "cache"))
    a, b, c = tmp_path / "one" / "m.gguf", tmp_path / "two" / "m.gguf", tmp_path / "m2.gguf"
    for path, data in ((a, b"GGUF" + bytes(range(256)) * 100), (b, b"GGUF" + bytes(range(256)) * 100),
                       (c, b"GGUF" + bytes(range(255, -1, -1)) * 100)):
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
    assert gguf_content_key(a) == gguf_content_key(b) != gguf_content_key(c)
    assert len(gguf_content_key(a)) == 16


def test_the_digest_is_remembered_per_path_size_and_mtime(tmp_path, monkeypatch):
    monkeypatch.setenv("TIERKV_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF-one")
    first = gguf_content_key(f)
    st = f.stat()
    f.write_bytes(b"GGUF-two")  # same size; the memo answers while size and mtime are unchanged
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert gguf_content_key(f) == first
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert gguf_content_key(f) != first
