"""`tierkv bench io` disk measurements: disk->host and disk->device through POSIX pread and through kvikio
(GDS or compatibility mode, named), with the page cache dropped before each read where the OS allows it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from tierkv.bench.timing import entry, time_wall
from tierkv.errors import ConfigError

WRITE_PIECE = 16 * 1024**2


def disk_entries(device: torch.device, sizes: list[int], repeats: int, disk_dir: str | None) -> tuple[list[dict], list[dict]]:
    """Sequential reads of each size from a fresh file in disk_dir: (results, skipped). Removes the file."""
    from tierkv.paths import cache_dir

    folder = Path(disk_dir) if disk_dir else cache_dir("bench")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"disk dir {str(folder)!r} cannot be created ({e.strerror}); pass --disk-dir DIR") from None
    cuda, top = device.type == "cuda", max(sizes)
    fd_, path = tempfile.mkstemp(prefix="tierkv-bench-io-", suffix=".bin", dir=folder)
    os.close(fd_)
    try:
        write_file(path, top)
        fd = os.open(path, os.O_RDONLY)
        info = {"dir": str(folder), "filesystem": filesystem_of(str(folder))}
        info["page_cache"] = _cache_mode(info["filesystem"])
        drop = lambda: drop_page_cache(fd)  # noqa: E731
        host = torch.empty(top, dtype=torch.uint8, pin_memory=cuda)
        host.fill_(0)
        hview = host.numpy()
        dev = torch.empty(top, dtype=torch.uint8, device=device) if cuda else None
        res, skipped = [], []
        for n in sizes:
            res.append(entry("disk_to_host", n, time_wall(lambda n=n: pread_all(fd, hview[:n]), device, repeats, drop),
                             backend="posix", threads=1, **info))
            if cuda:
                res.append(entry("disk_to_device", n, time_wall(lambda n=n: pread_to_device(fd, host, dev, n), device,
                                                                 repeats, drop),
                                 backend="posix", path="pread into pinned memory, then one copy", threads=1, **info))
        if not cuda:
            skipped.append({"name": "disk_to_device (posix)", "reason": "no CUDA device"})
        got, skip = _kvikio_entries(path, folder, device, sizes, repeats, hview, dev, drop, info)
        os.close(fd)
        return res + got, skipped + skip
    finally:
        Path(path).unlink(missing_ok=True)


def _kvikio_entries(path, folder, device, sizes, repeats, hview, dev, drop, info) -> tuple[list[dict], list[dict]]:
    from tierkv.io.disk import choose_backend

    threads = 4
    try:
        choice, kvikio = choose_backend(folder, "kvikio", threads)
    except ConfigError as e:
        why = str(e).split(" (", 1)[-1].split(");", 1)[0]
        return [], [{"name": "disk_to_host (kvikio)", "reason": why},
                    {"name": "disk_to_device (kvikio)", "reason": why}]
    f = kvikio.CuFile(path, "r")
    res, skipped = [], []
    try:
        for n in sizes:
            res.append(entry("disk_to_host", n, time_wall(lambda n=n: f.pread(hview[:n], n, 0).get(), device, repeats,
                                                          drop), backend=choice.name, threads=threads, **info))
        if dev is None:
            skipped.append({"name": f"disk_to_device ({choice.name})", "reason": "no CUDA device"})
        else:
            for n in sizes:
                res.append(entry("disk_to_device", n, time_wall(lambda n=n: f.pread(dev[:n], n, 0).get(), device,
                                                                repeats, drop),
                                 backend=choice.name, path="kvikio CuFile.pread into device memory", threads=threads,
                                 **info))
    except Exception as e:  # kvikio raises RuntimeError subclasses of its own; report, do not hide
        skipped.append({"name": f"disk reads ({choice.name})", "reason": f"{type(e).__name__}: {str(e)[:160]}"})
    finally:
        f.close()
    return res, skipped


def write_file(path: str, nbytes: int) -> None:
    """Fill the file with pseudo-random bytes and fsync it, so its pages are clean and can be dropped."""
    rng = np.random.default_rng(0)
    piece = rng.integers(0, 256, min(nbytes, WRITE_PIECE), dtype=np.uint8)
    with open(path, "wb") as f:
        left = nbytes
        while left > 0:
            f.write(piece[: min(left, piece.size)].tobytes())
            left -= min(left, piece.size)
        f.flush()
        os.fsync(f.fileno())


def drop_page_cache(fd: int) -> None:
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _cache_mode(fs: str) -> str:
    if not hasattr(os, "posix_fadvise"):
        return "warm (posix_fadvise unavailable)"
    if fs in ("tmpfs", "ramfs", "overlay"):
        return f"cold requested (posix_fadvise DONTNEED), but {fs} may serve reads from memory"
    return "cold (posix_fadvise DONTNEED before each read)"


def pread_all(fd: int, buf: np.ndarray) -> None:
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], done)
        if got == 0:
            raise OSError(f"short read at {done}")
        done += got


def pread_to_device(fd: int, host: torch.Tensor, dev: torch.Tensor, n: int) -> None:
    pread_all(fd, host[:n].numpy())
    dev[:n].copy_(host[:n], non_blocking=True)


def filesystem_of(path: str) -> str:
    """The file system type of the mount holding path (from /proc/mounts), or 'unknown'."""
    try:
        real, best, kind = os.path.realpath(path), "", "unknown"
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and (real == parts[1] or real.startswith(parts[1].rstrip("/") + "/")) \
                        and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
        return kind
    except OSError:
        return "unknown"
