"""How `tierkv bench io` times a transfer and reports it: CUDA-event and wall-clock timers, and the result row.
Shared by the memory measurements (`io`) and the disk ones (`iodisk`)."""

from __future__ import annotations

from typing import Callable

import torch

from tierkv.bench.common import now, summarize, sync


def entry(name: str, size: int, seconds: list[float], **extra) -> dict:
    """One result row: GB/s (1e9 bytes/s) min/median/max over repeats, plus the median time."""
    gbps = summarize([size / s / 1e9 for s in seconds if s > 0])
    return {"name": name, "size": size, "repeats": len(seconds), "gbps": gbps,
            "seconds_median": summarize(seconds)["median"], **extra}


def time_events(fn: Callable[[], None], device: torch.device, repeats: int) -> list[float]:
    """Seconds per call measured with CUDA events on the current stream, after one warm-up call."""
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1000.0)
    return out


def time_wall(fn: Callable[[], None], device: torch.device, repeats: int,
              before: Callable[[], None] | None = None) -> list[float]:
    """Wall-clock seconds per call with device syncs around it; `before` runs untimed (e.g. drop the page cache)."""
    if before is not None:
        before()
    fn()
    sync(device)
    out = []
    for _ in range(repeats):
        if before is not None:
            before()
        sync(device)
        t0 = now()
        fn()
        sync(device)
        out.append(now() - t0)
    return out
