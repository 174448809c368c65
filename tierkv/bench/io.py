"""`tierkv bench io` memory measurements: host<->device (pinned, pageable), device->device, host memcpy, and
scattered 64-KiB chunk reads from pinned memory (host gather + copy, a copy per chunk, GPU gather through the
mapped pinned address). Disk reads live in `iodisk`; `run_io` puts both together.
"""

from __future__ import annotations

from typing import Callable

import torch

from tierkv.bench.iodisk import disk_entries
from tierkv.bench.timing import entry, time_events, time_wall

CHUNK_BYTES = 64 * 1024
SCATTER_COUNTS = (64, 256)


def copy_entries(device: torch.device, sizes: list[int], repeats: int) -> tuple[list[dict], list[dict]]:
    """Bulk copies at each size: (results, skipped)."""
    top = max(sizes)
    h_src = torch.ones(top, dtype=torch.uint8)  # touched, so page faults are not timed
    h_dst = torch.zeros(top, dtype=torch.uint8)
    res = [entry("host_to_host", n, time_wall(lambda n=n: h_dst[:n].copy_(h_src[:n]), device, repeats),
                 path="pageable memcpy") for n in sizes]
    if device.type != "cuda":
        skipped = [{"name": k, "reason": "no CUDA device"} for k in
                   ("host_to_device_pinned", "host_to_device_pageable", "device_to_host_pinned",
                    "device_to_host_pageable", "device_to_device")]
        return res, skipped
    pinned = torch.ones(top, dtype=torch.uint8, pin_memory=True)
    d_src = torch.ones(top, dtype=torch.uint8, device=device)
    d_dst = torch.empty(top, dtype=torch.uint8, device=device)
    cases = {
        "host_to_device_pinned": lambda n: d_dst[:n].copy_(pinned[:n], non_blocking=True),
        "host_to_device_pageable": lambda n: d_dst[:n].copy_(h_src[:n]),
        "device_to_host_pinned": lambda n: pinned[:n].copy_(d_src[:n], non_blocking=True),
        "device_to_host_pageable": lambda n: h_dst[:n].copy_(d_src[:n]),
        "device_to_device": lambda n: d_dst[:n].copy_(d_src[:n]),
    }
    for name, fn in cases.items():
        for n in sizes:
            res.append(entry(name, n, time_events(lambda fn=fn, n=n: fn(n), device, repeats), timer="cuda events",
                             note="bytes copied once (device_to_device reads and writes each byte)"
                             if name == "device_to_device" else None))
    return res, []


def cpu_gemv_entries(sizes: list[int], repeats: int) -> tuple[list[dict], list[dict]]:
    """Matrix-vector products on the CPU over bf16 weights of each size (4 MiB or more), all threads: the rate of a
    CPU-computed layer (the planner's `cpu` bandwidth)."""
    out = []
    for n in (n for n in sizes if n >= 4 * 1024**2):
        cols = 4096
        w = torch.ones(n // (2 * cols), cols, dtype=torch.bfloat16)
        x = torch.ones(cols, dtype=torch.bfloat16)
        out.append(entry("cpu_gemv", w.numel() * 2, time_wall(lambda w=w: w @ x, torch.device("cpu"), repeats),
                         path=f"bf16 ({w.shape[0]}, {cols}) @ vector, {torch.get_num_threads()} threads"))
    skipped = [] if out else [{"name": "cpu_gemv", "reason": "no size of 4 MiB or more"}]
    return out, skipped


def scatter_entries(device: torch.device, repeats: int, pool_bytes: int) -> tuple[list[dict], list[dict]]:
    """Scattered 64-KiB chunk reads from a pinned pool (plain memory on the CPU): (results, skipped)."""
    cuda = device.type == "cuda"
    slots = max(max(SCATTER_COUNTS), pool_bytes // CHUNK_BYTES)
    pool = torch.ones(slots, CHUNK_BYTES, dtype=torch.uint8, pin_memory=cuda)  # (slots, 64 KiB)
    gen = torch.Generator().manual_seed(0)
    res: list[dict] = []
    skipped: list[dict] = []
    mapped, why = _mapped(pool, device)
    for count in SCATTER_COUNTS:
        stage = torch.empty(count, CHUNK_BYTES, dtype=torch.uint8, pin_memory=cuda)
        dst = torch.empty(count, CHUNK_BYTES, dtype=torch.uint8, device=device)
        pick = lambda: torch.randperm(slots, generator=gen)[:count]  # noqa: E731 - fresh chunks every repeat
        idx = [pick()]

        def gather_copy() -> None:
            torch.index_select(pool, 0, idx[0], out=stage)
            if cuda:
                dst.copy_(stage, non_blocking=True)

        def per_chunk() -> None:
            for j, s in enumerate(idx[0].tolist()):
                dst[j].copy_(pool[s], non_blocking=True)

        def mapped_gather() -> None:
            torch.index_select(mapped, 0, idx[0].to(device, non_blocking=True), out=dst)

        def bulk() -> None:
            dst.copy_(pool[:count], non_blocking=True)

        new = lambda: idx.__setitem__(0, pick())  # noqa: E731
        size, extra = count * CHUNK_BYTES, {"chunks": count, "chunk_bytes": CHUNK_BYTES, "timer": "wall clock + sync"}
        res.append(entry("scatter_host_gather_copy", size, time_wall(gather_copy, device, repeats, new),
                         path="host index_select into staging" + (", one copy" if cuda else " (no device copy on CPU)"),
                         **extra))
        if not cuda:
            skipped += [{"name": f"scatter_{k} ({count} chunks)", "reason": "no CUDA device"}
                        for k in ("copy_per_chunk", "mapped_index_select", "bulk_reference")]
            continue
        res.append(entry("scatter_copy_per_chunk", size, time_wall(per_chunk, device, repeats, new),
                         path="one cudaMemcpyAsync per chunk", **extra))
        if mapped is None:
            skipped.append({"name": f"scatter_mapped_index_select ({count} chunks)", "reason": why})
        else:
            res.append(entry("scatter_mapped_index_select", size, time_wall(mapped_gather, device, repeats, new),
                             path="GPU index_select through the mapped pinned address (zero-copy)", **extra))
        res.append(entry("scatter_bulk_reference", size, time_wall(bulk, device, repeats),
                         path="one contiguous copy of the same bytes", **extra))
    return res, skipped


def _mapped(pool: torch.Tensor, device: torch.device) -> tuple[torch.Tensor | None, str]:
    """The pool's device-mapped view, or (None, why not)."""
    if device.type != "cuda":
        return None, "no CUDA device"
    from tierkv.kv.storage.host import map_pinned, probe_mapped_read

    if not probe_mapped_read(device):
        return None, "mapped pinned reads failed their probe on this machine"
    try:
        return map_pinned(pool.view(-1), device).view(pool.shape), ""
    except (RuntimeError, TypeError, ValueError) as e:
        return None, f"map_pinned failed: {e}"


def run_io(device: torch.device, sizes: list[int], repeats: int, disk_dir: str | None,
           progress: Callable[[str], None] = lambda _: None) -> dict:
    """Every measurement that exists on this machine, and what was skipped and why. Blocks; writes a temp file."""
    results, skipped = [], []
    for label, part in (("copies", lambda: copy_entries(device, sizes, repeats)),
                        ("scattered reads", lambda: scatter_entries(device, repeats,
                                                                    256 * 1024**2 if device.type == "cuda" else 64 * 1024**2)),
                        ("disk", lambda: disk_entries(device, sizes, repeats, disk_dir)),
                        ("CPU matrix-vector", lambda: cpu_gemv_entries(sizes, repeats))):
        progress(label)
        got, skip = part()
        results += got
        skipped += skip
    for r in results:
        if r.get("note") is None:
            r.pop("note", None)
    return {"kind": "io", "sizes": sizes, "repeats": repeats, "results": results, "skipped": skipped}
