"""Atomic small-file writes (temp file, fsync, rename), checksums and the on-disk format version.

Every stored tierkv file goes through here, so a crash never leaves a half-written file under its real name.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

FORMAT_VERSION = 1


def crc32(data) -> int:
    """CRC-32 of a bytes-like object (bytes, memoryview, numpy array). Does not mutate; pure CPU."""
    return zlib.crc32(memoryview(data).cast("B")) & 0xFFFFFFFF


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write data to path atomically: a temp file beside it, fsync, rename, fsync of the directory. Blocks."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
