"""`tierkv chat` driven through piped stdin: two turns, /save, /exit, then a second run resumes the session."""

import json
import subprocess
import sys

import pytest


def chat_cli(*args: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", "chat", *args], capture_output=True, text=True,
                          input=stdin, timeout=300)


@pytest.mark.slow
def test_repl_two_turns_save_exit_then_resume(smol_folder, tmp_path):
    session, context = tmp_path / "sess", tmp_path / "notes.txt"
    context.write_text("The launch code is 4417.")
    args = (str(smol_folder), "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "5")
    r = chat_cli(*args, "--context", str(context), "--session", str(session),
                 stdin="What is the launch code?\nRepeat it.\n/save\n/stats\n/exit\nnever sent\n")
    assert r.returncode == 0, r.stderr
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 2  # two streamed replies
    assert "context: " in r.stderr and f"saved {session}" in r.stderr
    stats = json.loads(next(ln for ln in r.stderr.splitlines() if ln.startswith("{")))
    assert stats["turns"] == 2 and (session / "session.json").is_file()

    r2 = chat_cli(*args, "--session", str(session), stdin="/stats\nThanks.\n/bogus\n/exit\n")
    assert r2.returncode == 0, r2.stderr
    assert f"resumed {session}: 2 turns, {stats['tokens_in_context']} tokens" in r2.stderr
    resumed = json.loads(next(ln for ln in r2.stderr.splitlines() if ln.startswith("{")))
    assert resumed["restored"]["tokens"] == stats["tokens_in_context"] and resumed["last_turn"]["prefilled"] == 0
    assert f"{stats['tokens_in_context']} reused" in r2.stderr and "unknown command /bogus" in r2.stderr
