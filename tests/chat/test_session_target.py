"""Where a save may write: only a new or empty directory or an earlier tierkv session; anything else is refused
with the user's files untouched."""

import os
from pathlib import Path

import pytest

import tierkv
from tierkv.session import SessionError

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
