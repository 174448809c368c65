"""Disk-tier run directories left by killed processes: reclaimed by the next store, never a live owner's; SIGTERM
unwinds `tierkv run` like Ctrl-C, so its files go with it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore

ROOT = Path(__file__).resolve().parents[2]


def _dead_pid() -> int:
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def _run_dir(parent: Path, pid: int, files: dict[str, bytes]) -> Path:
    path = parent / f"20261204-120000-{pid}-abc123"
    path.mkdir()
    for name, data in files.items():
        (path / name).write_bytes(data)
    return path


def test_next_store_reaps_only_dead_unkept_runs(tmp_path):
    dead = _dead_pid()
    stale = _run_dir(tmp_path, dead, {"kv.bin": b"x" * 4096, f".kvikio-probe-{dead}": b""})
    live = _run_dir(tmp_path, os.getpid(), {"kv.bin": b"y"})
    kept = tmp_path / f"20261204-120001-{dead}-def456"
    kept.mkdir()
    (kept / "kv.bin").write_bytes(b"z")
    (kept / "index.json").write_text("{}")  # a run closed with keep=True: the user asked for it
    foreign = tmp_path / f"20261204-120002-{dead}-0a0b0c"
    foreign.mkdir()
    (foreign / "thesis.txt").write_text("not ours")
    other = tmp_path / "my-data"
    other.mkdir()
    store = DiskStore(64, tmp_path, backend="posix")
    try:
        assert not stale.exists()
        assert live.is_dir() and kept.is_dir() and (foreign / "thesis.txt").is_file() and other.is_dir()
    finally:
        store.close()
    assert not store.run_dir.exists()


KILLED = """
import sys, time, torch
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore
store = DiskStore(64, sys.argv[1], backend="posix")
store.put(ChunkId(0, 0), torch.arange(64, dtype=torch.uint8))
print(store.run_dir, flush=True)
time.sleep(120)
"""


@pytest.mark.slow
def test_sigkilled_run_is_reclaimed_by_the_next_start(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", KILLED, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    left = Path(p.stdout.readline().strip())
    store = DiskStore(64, tmp_path, backend="posix")  # the owner is alive: its run stays
    assert (left / "kv.bin").stat().st_size > 0
    store.put(ChunkId(0, 0), torch.ones(64, dtype=torch.uint8))
    p.send_signal(signal.SIGKILL)
    p.wait()
    p.stdout.close()
    assert left.is_dir()  # nothing could clean up after SIGKILL
    again = DiskStore(64, tmp_path, backend="posix")
    assert not left.exists()
    assert store.run_dir.is_dir()  # our own open store is never touched
    store.close(), again.close()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_run_removes_its_disk_files(tmp_path):
    prompt = "hello world " * 80
    cmd = [sys.executable, "-m", "tierkv", "run", "llama-tiny", prompt, "--raw", "--device", "cpu",
           "--kv-gpu-budget", "160KiB", "--cpu-budget", "64KiB", "--disk-dir", str(tmp_path),
           "--max-new-tokens", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    deadline = time.time() + 60
    while time.time() < deadline and not any(d.joinpath("kv.bin").exists() and d.joinpath("kv.bin").stat().st_size
                                             for d in tmp_path.iterdir()):
        time.sleep(0.05)
    assert p.poll() is None, p.stderr.read()
    time.sleep(0.3)  # into decode
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
