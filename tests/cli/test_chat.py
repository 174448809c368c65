"""`tierkv chat` through the real CLI on a random-weight shape: /exit with unsaved turns, --stats, history off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ARGS = ("-m", "llama-tiny", "--device", "cpu", "-n", "3")


def chat(*args: str, stdin: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", "chat", *args], capture_output=True, text=True,
                          input=stdin, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_exit_with_unsaved_turns_says_so_and_a_second_exit_quits():
    r = chat(*ARGS, stdin="hello\n/exit\nstill here\n/exit\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert "1 unsaved turn(s): /save [DIR] keeps them, /exit again quits" in r.stderr
    assert r.stderr.count("tok prefilled") == 2  # "still here" was answered, "never sent" was not


@pytest.mark.slow
def test_exit_after_save_quits_at_once(tmp_path):
    r = chat(*ARGS, stdin=f"hello\n/save {tmp_path / 's'}\n/exit\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert "unsaved" not in r.stderr and r.stderr.count("tok prefilled") == 1


@pytest.mark.slow
def test_stats_after_each_reply_with_the_dense_cache():
    r = chat(*ARGS, "--stats", stdin="hello\nagain\n/exit\n/exit\n")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(ln) for ln in r.stderr.splitlines() if ln.startswith("{")]
    assert len(rows) == 2
    assert rows[1]["last_turn"]["new_tokens"] == 3 and rows[1]["last_turn"]["prefill_s"] > 0
    assert rows[1]["tier_bytes"]["device"] > 0 and rows[1]["peak_memory"] > 10 * 2**20


@pytest.mark.slow
def test_bad_sampling_flag_and_two_models_are_refused():
    r = chat(*ARGS, "--temperature", "-1", stdin="")
    assert r.returncode == 2 and r.stderr.strip() == "error: temperature=-1.0 is out of range; give 0 (greedy) or more"
    r = chat("llama-tiny", "-m", "llama-tiny", stdin="")
    assert r.returncode == 2 and "the model is given twice" in r.stderr


@pytest.mark.slow
def test_context_file_that_is_not_utf8(tmp_path):
    bad = tmp_path / "ctx.txt"
    bad.write_bytes(b"ok \xff\xfe")
    r = chat(*ARGS, "--context", str(bad), stdin="")
    assert r.returncode == 2 and "byte 0xff at offset 3" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def _chat_on_a_terminal(cache_dir, *extra: str) -> int:
    """Run the REPL on a pseudo-terminal (input() uses readline, and so the history file, only on a terminal)."""
    import pty

    leader, follower = pty.openpty()
    env = {**os.environ, "TIERKV_CACHE_DIR": str(cache_dir)}
    env.pop("TIERKV_NO_HISTORY", None)
    p = subprocess.Popen([sys.executable, "-m", "tierkv", "chat", *ARGS, *extra], stdin=follower, stdout=follower,
                         stderr=subprocess.DEVNULL, env=env)
    os.close(follower)
    os.write(leader, b"/help\n/exit\n")
    code = p.wait(timeout=300)
    os.close(leader)
    return code


@pytest.mark.slow
def test_history_file_is_written_on_a_terminal_unless_turned_off(tmp_path):
    assert _chat_on_a_terminal(tmp_path / "on") == 0
    assert "/help" in (tmp_path / "on" / "chat_history").read_text()
    assert _chat_on_a_terminal(tmp_path / "off", "--no-history") == 0
    assert not (tmp_path / "off" / "chat_history").exists()
