"""Helpers shared by the benchmarks: parsing contexts and sizes, summarising repeats, syncing, run records.

Sizes and contexts are ints internally; "32K" contexts use K=1024, sizes follow `tierkv.config.parse_size`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import shlex
import statistics
import sys
import time
from typing import Sequence

import torch

from tierkv.config import parse_size
from tierkv.errors import ConfigError

_CTX_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmM]?)\s*$")


def parse_contexts(text: str) -> list[int]:
    """'1K,32K,128K' -> [1024, 32768, 131072] (K = 1024, M = 1024**2); plain numbers are tokens."""
    out = []
    for part in str(text).split(","):
        m = _CTX_RE.match(part)
        if not m:
            raise ConfigError(f"context {part.strip()!r} is not a token count; use e.g. 1K,32K,128K or 4096")
        mult = {"": 1, "k": 1024, "m": 1024**2}[m.group(2).lower()]
        n = int(float(m.group(1)) * mult)
        if n < 1:
            raise ConfigError(f"context {part.strip()!r} must be at least 1 token")
        out.append(n)
    return out


def parse_sizes(text: str) -> list[int]:
    """'64KiB,1MiB,256MiB' -> byte counts (each at least 1 byte)."""
    sizes = [parse_size(p.strip(), "size") for p in str(text).split(",") if p.strip()]
    if not sizes or any(s < 1 for s in sizes):
        raise ConfigError(f"sizes {text!r} must list positive sizes, e.g. 64KiB,1MiB,256MiB")
    return sizes


def format_context(n: int) -> str:
    """1024 -> '1K', 131072 -> '128K', 1000 -> '1000'."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def summarize(values: Sequence[float]) -> dict:
    """{'min', 'median', 'max'} of finite values (empty input gives NaNs, which callers must not report)."""
    vals = [v for v in values if math.isfinite(v)]
    if not vals:
        return {"min": math.nan, "median": math.nan, "max": math.nan}
    return {"min": min(vals), "median": statistics.median(vals), "max": max(vals)}


def sync(device: torch.device) -> None:
    """Wait for all queued work on the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    return time.perf_counter()


def device_name(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' on CUDA, the CPU model on the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu ({os.cpu_count()} cores)"


def run_record(device: torch.device) -> dict:
    """The closing fields of every benchmark output: device, date and the command that produced it."""
    argv = ["tierkv", *sys.argv[1:]] if sys.argv and sys.argv[0].endswith(("tierkv", "__main__.py")) else sys.argv
    return {"device": device_name(device), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": shlex.join(argv)}


def emit(record: dict, path: str | None) -> None:
    """Write a bench script's record as JSON to path (when given) and print it as the closing JSON line."""
    if path:
        with open(path, "w") as f:
            json.dump(record, f, indent=1)
    print(json.dumps(record))


def bench_device(device: str | None) -> torch.device:
    """The device to benchmark: cuda when available unless told otherwise."""
    from tierkv.llm import resolve_device

    return resolve_device(device)
