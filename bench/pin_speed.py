"""How long pinning the sparse cache's host pool takes, by method: the first generate call of a capacity class
pins K and V for every position (about 17 GB at 128K on the 8B shape) before prefill starts.

Methods, each on a fresh anonymous mapping of --gib GiB:
  register          cudaHostRegister of the whole mapping (tierkv/io/pinned.py today)
  hugepage          madvise(MADV_HUGEPAGE) first, then register
  populate-hugepage MADV_HUGEPAGE, touch every page from NumPy, then register (shows the fault share)
  torch             torch.empty(pin_memory=True) (PyTorch's caching host allocator, cudaHostAlloc)
  register-bg       hugepage + register in 64 MiB pieces on a thread while the GPU runs matmuls: the pin time
                    and how much the GPU work slows (the cost of overlapping the pin with prefill)
  register-queued   register 2 GiB on the main thread while about 3 s of GPU work is queued: does it wait?
    python bench/pin_speed.py --gib 8 --out $OUT/pin-speed.json
"""

from __future__ import annotations

import argparse
import json
import mmap
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

FLAGS = 0x01 | 0x02  # portable, mapped
PIECE = 64 * 1024**2


def _register(ptr: int, n: int) -> None:
    err = torch.cuda.cudart().cudaHostRegister(ptr, n, FLAGS)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister failed: {err}")


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)


def _mapping(nbytes: int, huge: bool) -> tuple[mmap.mmap, torch.Tensor]:
    mem = mmap.mmap(-1, nbytes)
    if huge:
        mem.madvise(mmap.MADV_HUGEPAGE)
    return mem, torch.frombuffer(mem, dtype=torch.uint8)


def timed_register(nbytes: int, huge: bool, populate: bool) -> dict:
    mem, t = _mapping(nbytes, huge)
    t0 = time.perf_counter()
    if populate:
        np.frombuffer(mem, dtype=np.uint8)[::4096] = 0  # fault every 4 KiB page in
    t1 = time.perf_counter()
    _register(t.data_ptr(), nbytes)
    t2 = time.perf_counter()
    _unregister(t.data_ptr())
    del t
    mem.close()
    return {"fault_s": round(t1 - t0, 3), "register_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
            "GB_per_s": round(nbytes / (t2 - t0) / 1e9, 2)}


def timed_torch(nbytes: int) -> dict:
    t0 = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dt = time.perf_counter() - t0
    del t
    torch.cuda.synchronize()
    return {"total_s": round(dt, 3), "GB_per_s": round(nbytes / dt / 1e9, 2)}


def _matmuls(a: torch.Tensor, n: int) -> float:
    """Seconds for n prefill-sized matmuls (synchronised)."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        a = a @ a
        a = a / a.norm()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def timed_background(nbytes: int) -> dict:
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    _matmuls(a, 50)
    alone = _matmuls(a, 500) / 500
    mem, t = _mapping(nbytes, True)
    ptr, done = t.data_ptr(), {}

    def pin() -> None:
        t0 = time.perf_counter()
        for off in range(0, nbytes, PIECE):
            _register(ptr + off, min(PIECE, nbytes - off))
        done["pin_s"] = time.perf_counter() - t0

    th = threading.Thread(target=pin)
    th.start()
    busy, n = 0.0, 0
    while th.is_alive():
        busy += _matmuls(a, 50)
        n += 50
    th.join()
    for off in range(0, nbytes, PIECE):
        _unregister(ptr + off)
    del t
    mem.close()
    return {"pin_s": round(done["pin_s"], 3), "GB_per_s": round(nbytes / done["pin_s"] / 1e9, 2),
            "matmul_ms_alone": round(1000 * alone, 4), "matmul_ms_beside_pin": round(1000 * busy / max(1, n), 4),
            "matmuls_beside_pin": n}


def timed_queued(nbytes: int) -> dict:
    """Register on the main thread while the GPU works through queued matmuls (what a layer-major prefill does):
    whether cudaHostRegister waits for the queue (then the pinning does not overlap the GPU's work)."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    per = _matmuls(a, 200) / 200
    mem, t = _mapping(nbytes, True)
    queued = max(100, int(3.0 / per))  # about 3 s of GPU work
    for _ in range(queued):
        a = a @ a
        a = a / a.norm()
    t0 = time.perf_counter()
    _register(t.data_ptr(), nbytes)
    reg = time.perf_counter() - t0
    busy_after = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    _unregister(t.data_ptr())
    del t
    mem.close()
    return {"gpu_queue_s": round(queued * per, 3), "register_s": round(reg, 3),
            "gpu_still_busy_after_register": busy_after, "register_then_drain_s": round(total, 3)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gib", type=float, default=8.0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    nbytes = int(args.gib * 1024**3) // PIECE * PIECE
    torch.cuda.init()
    res = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": " ".join(sys.argv), "bytes": nbytes,
           "thp": Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
           if Path("/sys/kernel/mm/transparent_hugepage/enabled").exists() else None}
    res["register"] = timed_register(nbytes, huge=False, populate=False)
    res["hugepage"] = timed_register(nbytes, huge=True, populate=False)
    res["populate-hugepage"] = timed_register(nbytes, huge=True, populate=True)
    res["torch"] = timed_torch(nbytes)
    res["register-bg"] = timed_background(nbytes)
    res["register-queued"] = timed_queued(min(nbytes, 2 * 1024**3))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
