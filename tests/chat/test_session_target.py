"""Where a save may write: only a new or empty directory or an earlier tierkv session; every I/O failure is one
TierKVError naming the path, with the user's files untouched and the conversation still usable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import tierkv
from tierkv.errors import StorageError
from tierkv.session import SessionError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def chat():
    llm = tierkv.load("llama-tiny", device="cpu", dtype="fp32")
    chat = llm.chat(context="some context " * 20, max_new_tokens=3)
    chat.send("first turn")
    yield chat
    chat.close()


def _tree(root: Path) -> dict:
    """Every file under root (hidden ones too) with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_directory_with_user_files_is_refused_untouched(chat, tmp_path):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "thesis.txt").write_text("three years of work")
    (target / "sub").mkdir()
    (target / "sub" / "data.csv").write_text("1,2,3")
    before = _tree(tmp_path)
    with pytest.raises(SessionError, match="not a tierkv session.*'sub'.*nothing was changed") as err:
        chat.save(target)
    assert "\n" not in str(err.value)
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["notes"]


def test_regular_file_is_refused_untouched(chat, tmp_path):
    target = tmp_path / "report.txt"
    target.write_text("keep me")
    with pytest.raises(SessionError, match="is a file, not a directory"):
        chat.save(target)
    assert target.read_text() == "keep me" and sorted(os.listdir(tmp_path)) == ["report.txt"]


def test_session_with_a_foreign_file_is_refused(chat, tmp_path):
    target = tmp_path / "s"
    chat.save(target)
    (target / "my-notes.md").write_text("mine")
    before = _tree(target)
    with pytest.raises(SessionError, match="'my-notes.md'"):
        chat.save(target)
    assert _tree(target) == before


def test_new_empty_and_earlier_session_targets_are_written(chat, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    chat.save(empty)
    chat.save(empty)  # now an earlier session: replaced
    chat.save(tmp_path / "new" / "deeper")
    for root in (empty, tmp_path / "new" / "deeper"):
        assert tierkv.Chat.load(root, chat.llm).ids == chat.ids


def test_unwritable_target_is_one_error_and_chat_goes_on(chat, tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    with pytest.raises(StorageError, match=f"cannot save the session to {blocker}/s .*choose a writable") as err:
        chat.save(blocker / "s")  # a parent that is a file: the OS refuses (root ignores read-only modes)
    assert "\n" not in str(err.value)
    turns = chat.stats["turns"]
    assert chat.send("still here?") is not None and chat.stats["turns"] == turns + 1


WRITE_LIMIT = """
import resource, signal, sys
import tierkv
from tierkv.errors import TierKVError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us
llm = tierkv.load("llama-tiny", device="cpu", dtype="fp32")
chat = llm.chat(context="some context " * 200, max_new_tokens=3)
chat.send("first turn")
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))  # the soft limit only, so it can be lifted again
try:
    chat.save(sys.argv[1])
except TierKVError as e:
    print("error:", e)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
chat.save(sys.argv[1])
print("saved after", chat.stats["turns"], "turns")
"""


@pytest.mark.slow
def test_full_disk_mid_save_leaves_no_temp_and_a_later_save_works(tmp_path):
    target = tmp_path / "s"
    r = subprocess.run([sys.executable, "-c", WRITE_LIMIT, str(target)], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"error: cannot save the session to {target} (File too large" in r.stdout
    assert "saved after 1 turns" in r.stdout
    assert sorted(os.listdir(tmp_path)) == ["s"]  # the failed save's temp directory is gone


@pytest.mark.slow
def test_repl_survives_a_failed_save(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "tierkv", "chat", "llama-tiny", "--device", "cpu", "--max-new-tokens", "2"],
                       input=f"hello\n/save {blocker}/s\nagain\n/stats\n/exit\n", capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert f"error: cannot save the session to {blocker}/s (" in r.stderr
    assert '"turns": 2' in r.stderr  # the turn after the failed save ran, and the first is still there
