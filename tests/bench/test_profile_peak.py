"""bench/profile_peak.py's replay of allocator events: the peak counts only from the bench's reset."""

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "profile_peak.py"


def _load():
    spec = importlib.util.spec_from_file_location("profile_peak", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ev(action, addr, size):
    return {"action": action, "addr": addr, "size": size}


def test_the_peak_counts_from_the_reset_but_keeps_blocks_allocated_before_it():
    pp = _load()
    trace = [_ev("alloc", 1, 1000), _ev("alloc", 2, 500), _ev("free_requested", 1, 1000),  # load: peak 1,500
             _ev("alloc", 3, 300), _ev("alloc", 4, 200), _ev("free_requested", 4, 200)]  # the row: peak 1,000
    peak, at, live = pp.peak_blocks(trace)
    assert (peak, at, sorted(live)) == (1500, 1, [1, 2])
    peak, at, live = pp.peak_blocks(trace, start=3)
    assert (peak, at, sorted(live)) == (1000, 4, [2, 3, 4])  # block 2 came before the reset and still counts
