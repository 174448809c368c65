"""Helpers of the chat tests that are not fixtures: the conversation the `convo` fixture (conftest.py) runs, and
the runner of worker.py in a fresh process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SYSTEM = "You are a terse assistant."
CONTEXT = "Notes: the project is called tierkv. Its mascot is a blue heron named Ada."
TURNS = ["What is the mascot?", "What is its name?", "Thanks, bye."]
MAX_NEW = 6

ROOT = Path(__file__).resolve().parents[2]


def worker(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run tests/chat/worker.py with args in a new Python process from the repo root; assert it succeeded unless
    check is False."""
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("worker.py")), *args], capture_output=True,
                       text=True, timeout=300, cwd=ROOT)
    if check:
        assert r.returncode == 0, r.stderr
    return r
