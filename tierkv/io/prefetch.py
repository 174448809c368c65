"""The prefetcher: the one owner of the copy stream, its events and the disk-read threads.

`prepare` starts gathering a batch of chunk rows (from device slots, host slots, disk) into a destination
buffer on the compute device and returns a ticket; `complete` makes the compute stream wait for exactly that
ticket and returns the rows. On the CPU the same calls run the copies synchronously (disk reads still use threads).
"""

from __future__ import annotations

import contextlib
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence

import numpy as np
import torch

from tierkv.io.staging import StagingBuffer, StagingRing

HOST_READS = ("mapped", "copy", "direct")
DiskReader = Callable[[Hashable, np.ndarray], None]  # fills the buffer with one chunk; raises on checksum failure


@dataclass
class Sources:
    """Where rows come from: device slots (slots, nbytes), host slots and their device-mapped view, a disk reader."""

    device: torch.Tensor | None = None
    host: torch.Tensor | None = None
    host_mapped: torch.Tensor | None = None
    read_disk: DiskReader | None = None


@dataclass
class Ticket:
    """One batch in flight. Rows of `rows` are: device slots, then host slots, then disk chunks, in plan order."""

    rows: torch.Tensor  # (n, nbytes) view of the destination
    n_device: int
    n_host: int
    disk_keys: list
    futures: list[Future] = field(default_factory=list)
    disk_buf: StagingBuffer | None = None
    event: object | None = None
    done: bool = False


def _index(slots: Sequence[int] | torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Slot indices as a long tensor on `device` (callers may pass one already there: no copy then)."""
    if isinstance(slots, torch.Tensor):
        return slots.to(device, non_blocking=True)
    return torch.tensor(slots, dtype=torch.long).to(device, non_blocking=True)


class Prefetcher:
    """Issues gathers on a dedicated copy stream (CUDA) and disk reads on a small thread pool.

    host_read: 'mapped' (GPU reads pinned host slots in place), 'copy' (host gather into staging, one copy),
    'direct' (compute device is the CPU). Not thread-safe: call from the driving thread.
    """

    def __init__(self, device: torch.device | str, nbytes: int, staging: StagingRing, *, host_read: str,
                 threads: int = 4) -> None:
        if host_read not in HOST_READS:
            raise ValueError(f"host_read={host_read!r}; use one of {HOST_READS}")
        self.device, self.nbytes, self.staging, self.host_read = torch.device(device), nbytes, staging, host_read
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.threads = max(1, threads)
        self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tierkv-io")
        self._open: list[Ticket] = []
        self.bytes = {"device->device": 0, "host->device": 0, "disk->device": 0}
        self.io_wait_s = 0.0

    def set_threads(self, threads: int) -> None:
        """Resize the disk-read pool (after the disk's parallelism is known). Waits for reads in flight."""
        if max(1, threads) != self.threads:
            self._pool.shutdown(wait=True)
            self.threads = max(1, threads)
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="tierkv-io")

    def _on_copy_stream(self):
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _record(self):
        if not self.cuda:
            return None
        ev = torch.cuda.Event()
        ev.record(self.stream)
        return ev

    def prepare(self, dest: torch.Tensor, device_slots: Sequence[int], host_slots: Sequence[int],
                disk_keys: Sequence[Hashable], src: Sources) -> Ticket:
        """Start filling dest[:n] (dest: (>=n, nbytes) uint8 on the compute device). Returns at once; disk reads
        continue on threads. dest must not be touched until `complete`."""
        nd, nh, nk = len(device_slots), len(host_slots), len(disk_keys)
        rows = dest[: nd + nh + nk]
        t = Ticket(rows, nd, nh, list(disk_keys))
        if nk:  # start the slow part first
            t.disk_buf = self.staging.acquire()
            flat = t.disk_buf.data.numpy()
            for i, key in enumerate(t.disk_keys):
                t.futures.append(self._pool.submit(src.read_disk, key, flat[i * self.nbytes:(i + 1) * self.nbytes]))
        if self.cuda:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # pool writes and earlier users of dest
        with self._on_copy_stream():
            if nd:
                torch.index_select(src.device, 0, _index(device_slots, self.device), out=rows[:nd])
            if nh:
                self._gather_host(rows[nd:nd + nh], host_slots, src)
        t.event = self._record()
        self.bytes["device->device"] += nd * self.nbytes
        self.bytes["host->device"] += nh * self.nbytes
        self._open.append(t)
        return t

    def _gather_host(self, out: torch.Tensor, slots: Sequence[int], src: Sources) -> None:
        if self.host_read == "direct":
            torch.index_select(src.host, 0, _index(slots, "cpu"), out=out)
        elif self.host_read == "mapped":  # a GPU kernel reads pinned memory over the link, no host work
            torch.index_select(src.host_mapped, 0, _index(slots, self.device), out=out)
        else:
            buf = self.staging.acquire()
            stage = buf.data[: len(slots) * self.nbytes].view(len(slots), self.nbytes)
            torch.index_select(src.host, 0, _index(slots, "cpu"), out=stage)
            out.copy_(stage, non_blocking=True)
            self.staging.release(buf, self._record())

    def complete(self, t: Ticket) -> torch.Tensor:
        """Rows of the ticket, ready for kernels on the current stream. Blocks on disk reads still running;
        raises what a read raised (IntegrityError, StorageError). Mutates the staging ring."""
        if t.done:
            return t.rows
        t0 = time.perf_counter()
        try:
            if t.futures:
                wait(t.futures)
                for f in t.futures:
                    f.result()
        finally:
            self.io_wait_s += time.perf_counter() - t0
            if t.disk_buf is not None and any(not f.done() or f.exception() for f in t.futures):
                self._finish(t)
        if t.disk_buf is not None:
            nk, start = len(t.disk_keys), t.n_device + t.n_host
            with self._on_copy_stream():
                stage = t.disk_buf.data[: nk * self.nbytes].view(nk, self.nbytes)
                t.rows[start:].copy_(stage, non_blocking=True)
            t.event = self._record()
            self.staging.release(t.disk_buf, t.event)
            t.disk_buf = None
            self.bytes["disk->device"] += nk * self.nbytes
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(t.event)
        self._finish(t)
        return t.rows

    def _finish(self, t: Ticket) -> None:
        if t.disk_buf is not None:  # a failed read: give the buffer back, nothing was copied out of it
            wait(t.futures)
            self.staging.release(t.disk_buf)
            t.disk_buf = None
        t.done = True
        if t in self._open:
            self._open.remove(t)

    def fence(self) -> None:
        """Wait until no read of any tier slot is in flight, so slots may be overwritten. Blocks."""
        t0 = time.perf_counter()
        for t in self._open:
            wait(t.futures)
        if self.cuda:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        self.io_wait_s += time.perf_counter() - t0

    @property
    def in_flight(self) -> int:
        """Tickets prepared and not yet completed."""
        return len(self._open)

    def close(self) -> None:
        """Finish outstanding reads and stop the threads. Safe to call twice."""
        for t in list(self._open):
            self._finish(t)
        self._pool.shutdown(wait=True)
        if self.cuda:
            self.stream.synchronize()
        self.staging.close()
