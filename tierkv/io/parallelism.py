"""How many threads a disk wants for scattered chunk reads, measured once in the directory that will hold
the disk tier: a probe file is read in random order, page cache dropped, with 1, 4 and 16 threads.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tierkv.errors import StorageError

CANDIDATES = (1, 4, 16)


@dataclass(frozen=True)
class Parallelism:
    """The chosen thread count and the GB/s measured for each candidate (shown in stats)."""

    threads: int
    gbps: dict[int, float] = field(default_factory=dict)


def drop_cache(fd: int) -> None:
    """Ask the OS to drop the open file's pages from its page cache (a no-op where posix_fadvise is missing)."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def measure_read_parallelism(directory: str | os.PathLike, chunk_bytes: int = 64 * 1024, chunks: int = 256,
                             candidates: tuple[int, ...] = CANDIDATES, tolerance: float = 0.1) -> Parallelism:
    """Write a probe of `chunks` chunks, read them in random order with each thread count; remove the probe.

    Picks the fewest threads within `tolerance` of the best rate. Blocks (a fraction of a second on an SSD).
    """
    path = Path(directory) / f".parallelism-probe-{os.getpid()}-{secrets.token_hex(3)}"
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, chunks * chunk_bytes, dtype=np.uint8)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    except OSError as e:
        raise StorageError(f"cannot write a probe file in {directory} ({e.strerror}); pass a writable disk_dir") from e
    try:
        if os.pwrite(fd, data.tobytes(), 0) != data.nbytes:  # a size limit cuts the write short
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        os.fsync(fd)
        rates = {t: _read_rate(fd, chunk_bytes, rng.permutation(chunks), t) for t in candidates}
    except OSError as e:
        raise StorageError(f"cannot write a {data.nbytes // 1024} KiB probe file in {directory} ({e.strerror}); "
                           f"free space or pass another disk_dir") from e
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    best = max(rates.values())
    chosen = min(t for t, r in rates.items() if r >= (1 - tolerance) * best)
    return Parallelism(chosen, rates)


def _read_rate(fd: int, chunk_bytes: int, order: np.ndarray, threads: int) -> float:
    drop_cache(fd)

    def read(i: int) -> int:
        return len(os.pread(fd, chunk_bytes, int(i) * chunk_bytes))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        total = sum(pool.map(read, order))
    return total / max(time.perf_counter() - t0, 1e-9) / 1e9
