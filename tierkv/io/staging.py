"""A ring of host staging buffers (pinned where CUDA exists) for disk reads and host->device copies.

A buffer is handed out only when no copy out of it is still in flight: each release may carry the event of
that copy, and `acquire` waits on it. On the CPU copies are synchronous and releases carry no event.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from tierkv.io.pinned import pinned_empty


def pinning_available() -> bool:
    """True when torch can allocate page-locked host memory (a CUDA build with a visible GPU). Decided once per caller."""
    return torch.cuda.is_available()


def alloc_host(nbytes: int, *, pin: bool) -> torch.Tensor:
    """A flat uint8 host tensor of nbytes, pinned if asked (callers ask only when `pinning_available()`): pinned
    memory is exactly nbytes and goes back to the OS when freed (see pinned.py)."""
    return pinned_empty(nbytes) if pin else torch.empty(nbytes, dtype=torch.uint8)


class CopyEvent(Protocol):
    """What a release waits on: a torch.cuda.Event (or a test double)."""

    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


class StagingBuffer:
    """One staging buffer: `data` is a flat uint8 host tensor; `index` its place in the ring."""

    def __init__(self, index: int, data: torch.Tensor) -> None:
        self.index, self.data = index, data
        self.event: CopyEvent | None = None
        self.held = False


class StagingRing:
    """`count` buffers of `nbytes` each, handed out oldest-released first.

    Not thread-safe: acquire/release from the driving thread; worker threads only fill buffers they were given.
    """

    def __init__(self, count: int, nbytes: int, *, pin: bool) -> None:
        if count < 1 or nbytes < 1:
            raise ValueError(f"staging ring needs count >= 1 and nbytes >= 1, got {count}, {nbytes}")
        self.nbytes, self.pinned = nbytes, pin
        self.buffers = [StagingBuffer(i, alloc_host(nbytes, pin=pin)) for i in range(count)]
        self._ready: deque[StagingBuffer] = deque(self.buffers)
        self.waits = 0  # acquisitions that had to wait for a copy still in flight

    def acquire(self) -> StagingBuffer:
        """The oldest released buffer, after waiting for any copy out of it to finish. Blocks; mutates.

        Raises RuntimeError when every buffer is held (callers must complete earlier transfers first).
        """
        if not self._ready:
            raise RuntimeError(f"all {len(self.buffers)} staging buffers are held; complete earlier fetches first")
        buf = self._ready.popleft()
        if buf.event is not None:
            if not buf.event.query():
                self.waits += 1
                buf.event.synchronize()
            buf.event = None
        buf.held = True
        return buf

    def release(self, buf: StagingBuffer, event: CopyEvent | None = None) -> None:
        """Give buf back; `event` marks a copy out of it still in flight (None: nothing in flight). Mutates."""
        if not buf.held:
            raise RuntimeError(f"staging buffer {buf.index} released twice")
        buf.held, buf.event = False, event
        self._ready.append(buf)

    def drain(self) -> None:
        """Wait until no copy out of any released buffer is in flight. Blocks."""
        for buf in self._ready:
            if buf.event is not None:
                buf.event.synchronize()
                buf.event = None

    @property
    def reserved_bytes(self) -> int:
        """Host bytes the ring holds (0 once closed)."""
        return sum(b.data.numel() for b in self.buffers)

    def close(self) -> None:
        """Wait for copies in flight, then free every buffer (pinned ones go back to the OS). Safe to call twice."""
        self.drain()
        self.buffers, self._ready = [], deque()

    @property
    def free(self) -> int:
        """Buffers not held (some may still have a copy in flight)."""
        return len(self._ready)
