"""`tierkv run` and `tierkv info` through the real CLI in a subprocess: answers and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest


def tierkv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", *args], capture_output=True, text=True, input=stdin,
                          timeout=600)


def test_run_default_model_answers_paris():
    r = tierkv("run", "What is the capital of France?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    stats = r.stderr.strip().splitlines()[-1]
    assert "prompt" in stats and "decode" in stats and "peak memory" in stats


def test_info_prints_facts():
    r = tierkv("info")
    assert r.returncode == 0, r.stderr
    for key in ("torch", "cuda_available", "kvikio", "disk_backend"):
        assert key in r.stdout


def _one_line_error(r, *fragments):
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for f in fragments:
        assert f in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_path(tmp_path):
    _one_line_error(tierkv("run", str(tmp_path / "missing"), "hi"), "does not exist")


def test_folder_that_is_not_a_model(tmp_path):
    _one_line_error(tierkv("run", str(tmp_path), "hi"), "not a model folder")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                          '"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    _one_line_error(tierkv("run", str(tmp_path), "hi"), "GPT2LMHeadModel", "not supported")


def test_prompt_longer_than_context(tmp_path, smol_folder):
    from tests.conftest import save_random_checkpoint

    folder = save_random_checkpoint(tmp_path, "llama31", smol_folder, max_positions=128)
    _one_line_error(tierkv("run", str(folder), "word " * 300, "--raw"), "prompt has 3", "context is 128 tokens")


def test_unknown_device():
    _one_line_error(tierkv("run", "--device", "tpu", "hi"), "'tpu'")


@pytest.mark.parametrize("flag", ["--prompt-file"])
def test_missing_prompt_file(flag, tmp_path):
    _one_line_error(tierkv("run", flag, str(tmp_path / "nope.txt")), "nope.txt")


def test_prompt_file_that_is_a_directory(tmp_path):
    _one_line_error(tierkv("run", "--prompt-file", str(tmp_path)), "is a directory")


def test_prompt_file_may_be_a_pipe(tmp_path):
    """bash's <(...) hands over a FIFO: it is read like a file."""
    import os
    import threading

    fifo = tmp_path / "prompt.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text("What is the capital of France?"))
    writer.start()
    r = tierkv("run", "--prompt-file", str(fifo), "--max-new-tokens", "16")
    writer.join()
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
