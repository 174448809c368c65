"""`tierkv cache`: lists and clears what tierkv keeps on disk, in a temporary TIERKV_CACHE_DIR."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def cache(root, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", "cache", *args], capture_output=True, text=True,
                          input=stdin, timeout=60, env={**os.environ, "TIERKV_CACHE_DIR": str(root)})


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def filled(tmp_path):
    root = tmp_path / "cache"
    (root / "gguf" / "model-0123456789abcdef").mkdir(parents=True)
    (root / "gguf" / "model-0123456789abcdef" / "model.safetensors").write_bytes(b"w" * 5000)
    stale = root / "runs" / f"20261204-120000-{_dead_pid()}-abcdef"
    live = root / "runs" / f"20261204-120000-{os.getpid()}-123456"
    for run in (stale, live):
        run.mkdir(parents=True)
        (run / "kv.bin").write_bytes(b"k" * 3000)
    (root / "chat_history").write_text("hello\n")
    return root, stale, live


@pytest.mark.slow
def test_list_shows_each_kind_and_entry(filled):
    root, stale, live = filled
    r = cache(root)
    assert r.returncode == 0, r.stderr
    assert f"cache directory {root}" in r.stdout
    for text in ("gguf", "model-0123456789abcdef", "runs", stale.name, "chat_history", f"in use by pid {os.getpid()}"):
        assert text in r.stdout
    assert cache(root, "list").stdout == r.stdout


@pytest.mark.slow
def test_clear_asks_then_removes_all_but_live_runs(filled):
    root, stale, live = filled
    r = cache(root, "clear")
    assert r.returncode == 2 and "pass --yes" in r.stderr and stale.exists()  # no terminal to ask on
    r = cache(root, "clear", "gguf", "--yes")
    assert r.returncode == 0, r.stderr
    assert not (root / "gguf" / "model-0123456789abcdef").exists() and stale.exists()
    r = cache(root, "clear", "-y")
    assert r.returncode == 0, r.stderr
    assert not stale.exists() and not (root / "chat_history").exists()
    assert (live / "kv.bin").is_file() and "kept 1 run(s) in use" in r.stdout


@pytest.mark.slow
def test_unknown_kind_is_refused(filled):
    root, stale, _ = filled
    r = cache(root, "clear", "models", "--yes")
    assert r.returncode == 2 and "unknown cache kind models" in r.stderr and stale.exists()
