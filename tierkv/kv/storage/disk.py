"""Disk tier: chunks in one preallocated file (`kv.bin`) under a run directory, at fixed slot offsets.

Each chunk's CRC-32 lives in an in-memory side table (written as `index.json` when the run is kept) and is
verified on every read. A full disk raises StorageError and leaves earlier chunks readable. The run directory is
removed on close() unless keep=True. Its name carries the owner's pid, so a run killed before close (SIGKILL, a
crash) is removed by the next store opened in the same parent once that pid is gone.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import struct
import threading
import time
from pathlib import Path

import numpy as np
import torch

from tierkv.config import format_size
from tierkv.errors import IntegrityError, StorageError
from tierkv.io.atomic import FORMAT_VERSION, atomic_write, crc32
from tierkv.io.disk import BackendChoice, choose_backend, open_file
from tierkv.io.owner import process_alive
from tierkv.io.parallelism import drop_cache, measure_read_parallelism
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.base import Tier

ALIGN = 4096  # slot offsets are page aligned (O_DIRECT / GDS friendly)
HEADER = struct.Struct("<8sIQQ")  # magic, format version, chunk bytes, slot stride
MAGIC = b"TIERKVKV"
EXTENT_BYTES = 64 * 1024**2  # the file grows (allocated, not sparse) this much at a time
_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def default_runs_dir() -> Path:
    """~/.cache/tierkv/runs (see tierkv.paths.cache_dir)."""
    from tierkv.paths import cache_dir  # noqa: PLC0415 - tiny helper module at the package root

    return cache_dir("runs")


RUN_NAME = re.compile(r"^\d{8}-\d{6}-(\d+)-[0-9a-f]{6}$")  # <date>-<time>-<owner pid>-<random>
# what an unkept run holds (data file and the backend probes); anything else marks a directory we did not make
RUN_FILES = re.compile(r"^(kv\.bin|\.kvikio-probe-\d+|\.parallelism-probe-\d+-[0-9a-f]+)$")


def reap_stale_runs(parent: str | os.PathLike) -> list[Path]:
    """Remove run directories under parent whose owner process is gone. Kept runs (index.json), directories with
    other files and live owners' runs are never touched. Returns what was removed. Blocks on the removals."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for path in entries:
        owner = RUN_NAME.match(path.name)
        if owner is None or not path.is_dir() or path.is_symlink() or process_alive(int(owner.group(1))):
            continue
        try:
            if all(RUN_FILES.match(f.name) and f.is_file() for f in path.iterdir()):
                shutil.rmtree(path)
                removed.append(path)
        except OSError:
            continue  # another process reaping the same run, or a permission problem: leave it
    return removed


def new_run_dir(parent: str | os.PathLike | None) -> Path:
    """A fresh run directory <parent>/<time>-<pid>-<random> (parent default: the user cache dir), after removing
    runs left by dead processes there. Creates it."""
    root = Path(parent) if parent is not None else default_runs_dir()
    reap_stale_runs(root)
    path = root / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{secrets.token_hex(3)}"
    try:
        path.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise StorageError(f"cannot create the KV disk directory {path} ({e.strerror}); pass a writable disk_dir") from e
    return path


class DiskStore(Tier):
    """Chunk slots in one file; reads are thread-safe (pread), writes come from the driving thread."""

    name = "disk"

    def __init__(self, chunk_bytes: int, directory: str | os.PathLike | None = None, *, backend: str = "auto",
                 threads: int | None = 4, keep: bool = False) -> None:
        self.chunk_bytes, self.keep = chunk_bytes, keep
        self.stride = -(-chunk_bytes // ALIGN) * ALIGN
        self.run_dir = new_run_dir(directory)
        self.path = self.run_dir / "kv.bin"
        self.file = None
        self._slot: dict[ChunkId, int] = {}
        try:
            # threads=None: as many read threads as this disk serves scattered chunk reads best with (measured)
            self.parallelism = measure_read_parallelism(self.run_dir, chunk_bytes) if threads is None else None
            self.threads = self.parallelism.threads if self.parallelism else threads
            self.backend, kvikio = choose_backend(self.run_dir, backend, self.threads)
            self.file = self._guard(lambda: open_file(self.path, self.backend, kvikio), "the data file")
        except BaseException:
            shutil.rmtree(self.run_dir, ignore_errors=True)  # a store that never opened leaves nothing behind
            raise
        self._crc: dict[int, int] = {}  # slot -> CRC-32 of its bytes
        self._free: list[int] = []
        self._next_slot, self._reserved = 0, 0
        self._bounce = torch.empty(chunk_bytes, dtype=torch.uint8)  # for puts from another device
        self._lock = threading.Lock()
        try:
            self._write_header()
        except StorageError:
            self.close()
            raise

    @property
    def backend_name(self) -> str:
        """The backend reads and writes go through now: the chosen one, or 'posix-fallback' once kvikio failed."""
        return self.file.name if self.file is not None else self.backend.name

    @property
    def backend_reason(self) -> str:
        """Why this backend: the choice's reason, or the kvikio failure that made POSIX take over."""
        return (self.file.fallback_reason if self.file is not None else "") or self.backend.reason

    def _write_header(self) -> None:
        head = np.zeros(ALIGN, dtype=np.uint8)
        head[: HEADER.size] = np.frombuffer(HEADER.pack(MAGIC, FORMAT_VERSION, self.chunk_bytes, self.stride), np.uint8)
        self._guard(lambda: (self.file.reserve(ALIGN), self.file.pwrite(head, 0)), "the file header")
        self._reserved = ALIGN

    def _offset(self, slot: int) -> int:
        return ALIGN + slot * self.stride

    def _guard(self, fn, what: str):
        """Run an I/O call; turn a full disk or size limit into one clear StorageError."""
        try:
            return fn()
        except OSError as e:
            if e.errno in _FULL_ERRNOS:
                raise StorageError(
                    f"the KV disk tier is full writing {what} to {self.path} ({os.strerror(e.errno)}, "
                    f"{format_size(self.nbytes)} stored); free space, pass a larger disk_dir, or raise cpu_budget"
                ) from e
            raise StorageError(f"KV disk I/O failed on {self.path} ({e}); check the disk_dir") from e

    def _take_slot(self) -> int:
        if self._free:
            return self._free.pop()
        slot, end = self._next_slot, self._offset(self._next_slot + 1)
        if end > self._reserved:
            self._extend(end)
        self._next_slot += 1
        return slot

    def _extend(self, end: int) -> None:
        """Grow the allocated file to hold `end` bytes: a whole extent if the disk allows, else just enough."""
        extent = max(end, min(self._reserved + EXTENT_BYTES, self._offset(self._next_slot + 1024)))
        try:
            self.file.reserve(extent)
            self._reserved = extent
            return
        except OSError as e:
            if e.errno not in _FULL_ERRNOS:
                raise StorageError(f"KV disk I/O failed on {self.path} ({e}); check the disk_dir") from e
        self._guard(lambda: self.file.reserve(end), f"a {format_size(end - self._reserved)} extension")
        self._reserved = end

    def put(self, chunk: ChunkId, data: torch.Tensor) -> None:
        """Write the chunk (a CPU tensor is written in place, others bounce through host memory). Blocks."""
        if chunk in self._slot:
            raise RuntimeError(f"chunk {tuple(chunk)} is already on disk")
        data = data.reshape(-1)
        if data.device.type != "cpu":
            self._bounce.copy_(data)
            data = self._bounce
        buf = data.numpy()
        slot = self._take_slot()
        try:
            self._guard(lambda: self.file.pwrite(buf, self._offset(slot)), f"chunk {tuple(chunk)}")
        except StorageError:
            self._free.append(slot)  # nothing recorded: earlier chunks stay valid and readable
            raise
        self._crc[slot] = crc32(buf)
        self._slot[chunk] = slot

    def read_into(self, chunk: ChunkId, dest: torch.Tensor | np.ndarray) -> None:
        """pread the chunk into a host buffer (uint8 (chunk_bytes,)) and verify its checksum. Thread-safe; blocks."""
        slot = self._slot[chunk]
        buf = dest if isinstance(dest, np.ndarray) else dest.reshape(-1).numpy()
        self._guard(lambda: self.file.pread(buf, self._offset(slot)), f"chunk {tuple(chunk)}")
        if crc32(buf) != self._crc[slot]:
            raise IntegrityError(
                f"KV chunk (layer {chunk.layer}, index {chunk.index}) in {self.path} at offset {self._offset(slot)} "
                f"failed its checksum; the file was modified or the disk is failing: delete {self.run_dir} and rerun")

    def evict(self, chunk: ChunkId) -> None:
        slot = self._slot.pop(chunk)
        self._crc.pop(slot, None)
        self._free.append(slot)

    def file_bytes(self) -> int:
        """Size of the data file now (0 once closed); read from the open descriptor, so a run directory removed
        mid-run still reports the space the file holds until close."""
        return os.fstat(self.file.fd).st_size if self.file is not None else 0

    def offset_of(self, chunk: ChunkId) -> int:
        """Byte offset of the chunk in `path` (for tests and tools)."""
        return self._offset(self._slot[chunk])

    def drop_page_cache(self) -> None:
        """Flush the file and ask the OS to drop it from the page cache, so that reads come from the disk (what a
        machine without spare RAM sees) rather than from memory that caches it. Blocks."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages are not dropped
            drop_cache(fd)
        finally:
            os.close(fd)

    def write_index(self) -> Path:
        """Write the checksum side table (index.json) atomically. Blocks."""
        index = {"format_version": FORMAT_VERSION, "chunk_bytes": self.chunk_bytes, "stride": self.stride,
                 "header_bytes": ALIGN, "chunks": [[c.layer, c.index, s, self._crc[s]] for c, s in self._slot.items()]}
        path = self.run_dir / "index.json"
        atomic_write(path, json.dumps(index).encode())
        return path

    def close(self) -> None:
        """Close the file; remove the run directory unless keep (then write index.json). Safe to call twice."""
        with self._lock:
            if self.file is None:
                return
            self.file.close()
            self.file = None
            if self.keep:
                self.write_index()
            else:
                shutil.rmtree(self.run_dir, ignore_errors=True)

    def choice(self) -> BackendChoice:
        return self.backend
