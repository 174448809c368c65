"""`tierkv run` and `tierkv info` through the real CLI in a subprocess: answers and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tierkv(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", *args], capture_output=True, text=True, input=stdin,
                          timeout=600)


@pytest.mark.slow
def test_run_default_model_answers_paris():
    r = tierkv("run", "What is the capital of France?", "--max-new-tokens", "24")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    stats = r.stderr.strip().splitlines()[-1]
    assert "prompt" in stats and "decode" in stats and "peak memory" in stats


@pytest.mark.slow
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


@pytest.mark.slow
def test_missing_path(tmp_path):
    _one_line_error(tierkv("run", str(tmp_path / "missing"), "hi"), "does not exist")


@pytest.mark.slow
def test_folder_that_is_not_a_model(tmp_path):
    _one_line_error(tierkv("run", str(tmp_path), "hi"), "not a model folder")


@pytest.mark.slow
def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], '
                                          '"n_embd": 8, "n_layer": 1, "n_head": 2, "vocab_size": 10}')
    (tmp_path / "model.safetensors").write_bytes(b"")
    _one_line_error(tierkv("run", str(tmp_path), "hi"), "GPT2LMHeadModel", "not supported")


@pytest.mark.slow
def test_prompt_longer_than_context(tmp_path, smol_folder):
    from tests.helpers import save_random_checkpoint

    folder = save_random_checkpoint(tmp_path, "llama31", smol_folder, max_positions=128)
    _one_line_error(tierkv("run", str(folder), "word " * 300, "--raw"), "prompt has 3", "context is 128 tokens")


@pytest.mark.slow
def test_unknown_device():
    _one_line_error(tierkv("run", "--device", "tpu", "hi"), "'tpu'")


@pytest.mark.parametrize("flag", ["--prompt-file"])
def test_missing_prompt_file(flag, tmp_path):
    _one_line_error(tierkv("run", flag, str(tmp_path / "nope.txt")), "nope.txt")


def test_prompt_file_that_is_a_directory(tmp_path):
    _one_line_error(tierkv("run", "--prompt-file", str(tmp_path)), "is a directory")


@pytest.mark.slow
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


# ---- bad input: one line on stderr, exit 2, before any model loads where possible ---------------------------
@pytest.mark.slow
@pytest.mark.parametrize("args, fragment", [
    (("-n", "-1", "hi"), "max_new_tokens=-1"),
    (("-n", "0", "hi"), "max_new_tokens=0"),
    (("--temperature", "-1", "hi"), "temperature=-1"),
    (("--temperature", "0.8", "--top-p", "0", "hi"), "top_p=0"),
    (("--top-k", "-2", "hi"), "top_k=-2"),
    (("--min-p", "1.5", "hi"), "min_p=1.5"),
    (("--repeat-penalty", "0", "hi"), "repeat_penalty=0"),
    (("",), "the prompt is empty"),
    (("   \n",), "the prompt is empty (only whitespace)"),
    (("-p", ""), "the prompt is empty"),
    (("llama-tiny", "-p", "hi", "--raw", "--system", "be brief"), "--system"),
    (("a", "b", "c"), "3 positional arguments"),
    (("-m", "llama-tiny", "-p", "hi", "extra"), "-m names the model"),
    (("llama-tiny", "-p", "hi", "--budget-floor-tokens", "-1"), "budget_floor_tokens=-1 must be a token count"),
])
def test_bad_input_is_one_line_and_exit_2(args, fragment):
    _one_line_error(tierkv("run", *args), fragment)


@pytest.mark.slow
def test_prompt_file_that_is_not_utf8_names_the_offset(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait".encode("latin-1"))
    _one_line_error(tierkv("run", "--prompt-file", str(bad)), "not UTF-8", "0xe9 at offset 3")


@pytest.mark.slow
def test_empty_prompt_file_and_empty_stdin(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n\t")
    _one_line_error(tierkv("run", "-f", str(empty)), "is empty")
    _one_line_error(tierkv("run", "llama-tiny", stdin="\n"), "the prompt on stdin is empty")


@pytest.mark.slow
def test_explicit_max_new_tokens_past_the_context_is_refused_up_front():
    # 50 prompt bytes (the shape's byte tokenizer) + 30 > a 64-token context
    r = tierkv("run", "llama-tiny", "x" * 50, "--device", "cpu", "--ctx-size", "64", "-n", "30")
    _one_line_error(r, "prompt has 50 tokens", "context is 64 tokens", "-n 14 or less")
    assert r.stdout == ""


@pytest.mark.slow
def test_default_max_new_tokens_stops_at_the_context_and_says_why():
    r = tierkv("run", "llama-tiny", "x" * 50, "--device", "cpu", "--ctx-size", "64", "--stats")
    assert r.returncode == 0, r.stderr
    stats = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
    assert stats["stop_reason"] == "context_full" and stats["new_tokens"] == 14 and stats["context_size"] == 64
    assert "stopped at the end of the context (64 tokens)" in r.stderr


@pytest.mark.slow
def test_ctx_size_above_the_model_is_refused():
    _one_line_error(tierkv("run", "llama-tiny", "hi", "--device", "cpu", "--ctx-size", str(1 << 21)), "ctx_size=")


# ---- --stats, sampling flags and stop strings ---------------------------------------------------------------
@pytest.mark.slow
def test_stats_prints_prefill_decode_and_memory_with_the_dense_cache():
    r = tierkv("run", "-m", "llama-tiny", "-p", "hello", "-n", "4", "--device", "cpu", "--stats")
    assert r.returncode == 0, r.stderr
    stats = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
    assert stats["prompt_tokens"] == 5 and stats["new_tokens"] == 4 and stats["stop_reason"] == "max_new_tokens"
    assert stats["prefill_tok_s"] > 0 and stats["decode_tok_s"] > 0 and stats["peak_memory"] > 10 * 2**20
    assert stats["kv"]["path"]["kind"] == "dense"  # every cache reports the path that ran (kv/factory.py)


@pytest.mark.slow
def test_stop_string_ends_the_reply_before_it():
    # without --stop the reply is "The capital of France is Paris." (test_run_default_model_answers_paris)
    r = tierkv("run", "What is the capital of France?", "-n", "24", "--stop", "Paris", "--stats")
    assert r.returncode == 0, r.stderr
    assert "France" in r.stdout and "Paris" not in r.stdout
    stats = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
    assert stats["stop_reason"] == "stop_string" and stats["new_tokens"] < 24


@pytest.mark.slow
def test_one_positional_with_a_slash_is_the_prompt_for_the_default_model():
    r = tierkv("run", "What is 1/2 + 1/3?", "-n", "8", "--stats")
    assert r.returncode == 0, r.stderr
    stats = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
    assert stats["prompt_tokens"] > 10 and stats["new_tokens"] >= 1 and r.stdout.strip()


def test_tier_flags_carry_the_token_budget_and_its_floor_and_the_help_says_the_defaults():
    from click.testing import CliRunner

    from tierkv.cli import chat, run
    from tierkv.cli.common import tier_settings

    flags = {"token_budget": "0.25", "budget_floor_tokens": 0, "rank": None, "temperature": 0.0}
    assert tier_settings(flags) == {"token_budget": 0.25, "budget_floor_tokens": 0}
    assert flags == {"temperature": 0.0}  # taken out; unset flags keep TierConfig's defaults
    for command in (run.command, chat.command):
        text = " ".join(CliRunner().invoke(command, ["--help"], terminal_width=200).output.split())
        assert "a fraction of the context (default: 0.125, at least --budget-floor-tokens)" in text
        assert "attends at least this many tokens (default: 2048; 0: the fraction alone)" in text
