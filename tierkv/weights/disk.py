"""Disk-resident layer weights (issue 18 item 4): each layer's packed block is described as extents of files (a
safetensors checkpoint read in place, or a spill file of packed blocks), and a reader thread fills a ring of
pinned staging buffers ahead of the streamer, so a disk read overlaps the host-to-device copy before it.

The checkpoint is read in place when its bytes are already the block's: the same dtype, and the fused matrices
([q; k; v], [gate; up]) are row concatenations, so each source tensor is one extent at its offset in the block.
Otherwise (another dtype, random weights) the packed blocks are written once to a spill file.
"""

from __future__ import annotations

import json
import os
import struct
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tierkv.io.disk import choose_backend, open_file, posix_pread
from tierkv.io.staging import alloc_host, pinning_available

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass(frozen=True)
class Extent:
    """nbytes of file `path` at `offset` go to `block_offset` of a layer's block."""

    path: str
    offset: int
    nbytes: int
    block_offset: int


@dataclass(frozen=True)
class StoredTensor:
    path: str
    offset: int  # absolute, in bytes
    nbytes: int
    dtype: torch.dtype | None  # None: a dtype tierkv does not stream in place
    shape: tuple[int, ...]


def safetensors_index(files: list[Path]) -> dict[str, StoredTensor]:
    """Where each tensor of these safetensors files lies: the 8-byte header length, the JSON header, then data."""
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            out[name] = StoredTensor(str(f), 8 + n + start, end - start, ST_DTYPES.get(meta["dtype"]),
                                     tuple(meta["shape"]))
    return out


def in_place_extents(layout, sources: dict[str, list[str]], index: dict[str, StoredTensor],
                     dtype: torch.dtype) -> list[Extent] | None:
    """Extents filling a block of `layout` straight from the checkpoint, or None when its bytes differ: block
    tensor name -> the checkpoint names concatenated (rows) into it, each stored as `dtype`."""
    extents = []
    for name, off in zip(layout.names, layout.offsets):
        at = off
        for src in sources[name]:
            t = index.get(src)
            if t is None or t.dtype != dtype:
                return None
            extents.append(Extent(t.path, t.offset, t.nbytes, at))
            at += t.nbytes
        if at - off != layout.nbytes_of(name):
            return None
    return extents


class SpillFile:
    """Packed layer blocks written one after another to one file (removed when opened on POSIX, else on close),
    4 KiB aligned."""

    ALIGN = 4096

    def __init__(self, directory: str | os.PathLike) -> None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.path = str(Path(directory) / f"weights-{os.getpid()}-{id(self):x}.bin")
        self.choice, self._kvikio = choose_backend(directory)
        self.file = open_file(self.path, self.choice, self._kvikio)
        if self.choice.name == "posix":  # reads go through the open descriptor: no file is left behind, even on a crash
            Path(self.path).unlink()
        else:  # kvikio may reopen by path: removed on close, or when this object goes away
            weakref.finalize(self, Path(self.path).unlink, missing_ok=True)
        self.end = 0

    def append(self, block: torch.Tensor) -> list[Extent]:
        """Write a flat uint8 host block; its one extent."""
        at = self.end
        self.file.pwrite(block.numpy(), at)
        self.end = -(-(at + block.numel()) // self.ALIGN) * self.ALIGN
        return [Extent(self.path, at, block.numel(), 0)]

    def close(self) -> None:
        self.file.close()
        Path(self.path).unlink(missing_ok=True)


class DiskLayers:
    """Reads disk-resident layers, in plan order and cyclically, into `buffers` pinned staging buffers on one
    reader thread. `acquire(layer)` waits for its read; `release(layer, event)` hands the buffer back once the
    copy out of it (event) is done, and the thread starts the next read into it."""

    def __init__(self, layouts: dict, extents: dict[int, list[Extent]], spill: SpillFile | None = None,
                 buffers: int = 2) -> None:
        self.layout = dict(sorted(layouts.items()))
        self.extents = extents
        self.order = list(self.layout)
        self.spill = spill
        top = max(lay.nbytes for lay in self.layout.values())
        self.pinned = pinning_available()
        self.staging = [alloc_host(top, pin=self.pinned) for _ in range(buffers)]
        self._np = [b.numpy() for b in self.staging]
        self._fds: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="tierkv-weights-disk")
        self._free = list(range(buffers))
        self._events: list = [None] * buffers
        self._pending: dict[int, tuple[Future, int]] = {}
        self._next = 0  # index in order of the next layer to read
        self._held: dict[int, int] = {}  # layer -> buffer handed out
        self.reads = self.read_bytes = 0
        self.read_s = self.wait_s = 0.0

    def _fd(self, path: str) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def _read(self, layer: int, b: int) -> float:
        """Worker: wait until the copy out of buffer b is done, then read the layer's extents into it."""
        if self._events[b] is not None:
            self._events[b].synchronize()
        t0 = time.perf_counter()
        buf = self._np[b]
        for e in self.extents[layer]:
            if self.spill is not None and e.path == self.spill.path:
                self.spill.file.pread(buf[e.block_offset:e.block_offset + e.nbytes], e.offset)
            else:
                posix_pread(self._fd(e.path), buf[e.block_offset:e.block_offset + e.nbytes], e.offset, e.path)
        return time.perf_counter() - t0

    def _submit(self) -> None:
        while self._free and len(self._pending) + len(self._held) < len(self.order):
            layer = self.order[self._next]
            if layer in self._pending or layer in self._held:
                return
            b = self._free.pop(0)
            self._pending[layer] = (self._pool.submit(self._read, layer, b), b)
            self._next = (self._next + 1) % len(self.order)

    def acquire(self, layer: int) -> torch.Tensor:
        """The staging buffer holding `layer`'s block (reads it now if it was not read ahead)."""
        if layer not in self._pending:  # out of order (a pass ended early): restart the ring at this layer
            self._drain()
            self._next = self.order.index(layer)
        self._submit()
        t0 = time.perf_counter()
        fut, b = self._pending.pop(layer)
        self.read_s += fut.result()
        self.wait_s += time.perf_counter() - t0
        self.reads += 1
        self.read_bytes += sum(e.nbytes for e in self.extents[layer])
        self._held[layer] = b
        return self.staging[b]

    def release(self, layer: int, event=None) -> None:
        b = self._held.pop(layer)
        self._events[b] = event
        self._free.append(b)
        self._submit()

    def _drain(self) -> None:
        for layer, (fut, b) in list(self._pending.items()):
            fut.result()
            self._free.append(b)
        self._pending.clear()
        for layer, b in list(self._held.items()):
            self._free.append(b)
        self._held.clear()

    def stats(self) -> dict:
        return {"disk_layers": len(self.order), "reads": self.reads, "read_bytes": self.read_bytes,
                "read_s": self.read_s, "read_wait_s": self.wait_s, "staging_pinned": self.pinned,
                "backend": self.spill.choice.name if self.spill is not None else "posix"}

    def reset_stats(self) -> None:
        self.reads = self.read_bytes = 0
        self.read_s = self.wait_s = 0.0

    def close(self) -> None:
        self._drain()
        self._pool.shutdown(wait=True)
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self.spill is not None:
            self.spill.close()
