"""Page-locked host memory of exactly the size asked, returned to the OS when its last tensor goes.

`torch.empty(..., pin_memory=True)` goes through PyTorch's caching host allocator, which rounds every block
up to a power of two and keeps freed blocks for reuse: a 16.01 GiB host tier pins 32 GiB and holds it after
the model is closed. The host tier is the biggest allocation tierkv makes, so it pins its own memory instead:
an anonymous mapping of the exact size, registered with CUDA (portable, mapped: GPU kernels read it in place
through its address), unregistered and unmapped when the last tensor viewing it is freed.
"""

from __future__ import annotations

import mmap
import resource

import torch

from tierkv.config import format_size
from tierkv.errors import BudgetError

_REGISTER_PORTABLE, _REGISTER_MAPPED = 0x01, 0x02


class _LockedMapping(mmap.mmap):
    """An anonymous mapping that CUDA has page-locked (whole or in parts); unregistered just before it is
    unmapped."""

    registered: list[int] | None = None  # start addresses of the registered parts

    def __del__(self) -> None:
        for ptr in self.registered or ():
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:  # at interpreter exit CUDA may be gone; the process's memory goes with it
                pass
        self.registered = None


def pinned_empty(nbytes: int) -> torch.Tensor:
    """A flat uint8 tensor of nbytes page-locked host memory (CUDA must be available), exact size.

    Falls back to PyTorch's caching pinned allocator when CUDA refuses to register the mapping.
    """
    if nbytes <= 0:
        return torch.empty(0, dtype=torch.uint8, pin_memory=True)
    mem = _LockedMapping(-1, nbytes)
    t = torch.frombuffer(mem, dtype=torch.uint8)  # keeps `mem` alive as long as any view of t lives
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), nbytes, _REGISTER_PORTABLE | _REGISTER_MAPPED)
    if int(err) != 0:  # e.g. a locked-memory limit: torch's allocator may still get memory another way
        del t
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    mem.registered = [t.data_ptr()]
    return t


class RegionPinned:
    """A flat uint8 host buffer of `regions` equal parts, each page-locked (portable, mapped) when first asked for.

    Pinning is slow (the kernel faults in, zeroes and locks every page: 2-3 GB/s on an H100 host), and the sparse
    cache's pool of K and V for every position is 17 GB at 128K on the 8B shape: pinned whole before prefill it
    held the first call back 8 s. A layer-major prefill pins one layer's part just before it writes it, while
    the GPU still works through the layers queued before, so most of the pinning hides behind prefill.
    Region 0 is pinned at once (a mapped view's address must be registered). Parts must not share a page; when
    they would, the buffer is one region. Huge pages are asked for (fewer pages to fault and lock).
    """

    def __init__(self, nbytes: int, regions: int) -> None:
        if nbytes <= 0 or regions < 1:
            raise ValueError(f"RegionPinned needs nbytes > 0 and regions >= 1, got {nbytes}, {regions}")
        if nbytes % regions or (nbytes // regions) % mmap.PAGESIZE:
            regions = 1
        self.region_bytes = nbytes // regions
        self._mem = _LockedMapping(-1, nbytes)
        self._mem.registered = []
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._mem.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._mem, dtype=torch.uint8)  # keeps the mapping alive
        self._pinned = [False] * regions
        self.pin(0)

    @property
    def all_pinned(self) -> bool:
        return all(self._pinned)

    def pin(self, region: int) -> None:
        """Page-lock one region (no-op when it is). Raises BudgetError when CUDA refuses (the locked-memory limit)."""
        if self._pinned[region]:
            return
        ptr, n = self.tensor.data_ptr() + region * self.region_bytes, self.region_bytes
        err = torch.cuda.cudart().cudaHostRegister(ptr, n, _REGISTER_PORTABLE | _REGISTER_MAPPED)
        if int(err) != 0:
            lim = memlock_limit()
            raise BudgetError(f"pinning {format_size(n)} of host memory failed (CUDA error {int(err)}) under the "
                              f"locked-memory limit RLIMIT_MEMLOCK={'unlimited' if lim is None else format_size(lim)}"
                              f"; raise it (ulimit -l) or lower the context")
        self._mem.registered.append(ptr)
        self._pinned[region] = True

    def pin_all(self) -> None:
        for i in range(len(self._pinned)):
            self.pin(i)


def memlock_limit() -> int | None:
    """The locked-memory limit (RLIMIT_MEMLOCK, `ulimit -l`) in bytes; None when unlimited."""
    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def unpinned_fallback(nbytes: int, error: BaseException, *, growing: bool, limit: int | None) -> str:
    """Decide what a failed pin of nbytes does. The first allocation of a host tier falls back to pageable memory
    (returns the note that stats show); growing a tier the GPU already reads in place cannot change its kind, so it
    stops with BudgetError. Both name the locked-memory limit (`limit` bytes, None: unlimited)."""
    cause = str(error).splitlines()[0][:100] if str(error) else type(error).__name__
    lim = "unlimited" if limit is None else format_size(limit)
    if growing:
        raise BudgetError(f"pinning {format_size(nbytes)} more host memory failed ({cause}) under the locked-memory "
                          f"limit RLIMIT_MEMLOCK={lim}; raise it (ulimit -l) or lower cpu_budget")
    return f"pinning {format_size(nbytes)} failed ({cause}) under RLIMIT_MEMLOCK={lim}: pageable memory, copied in"


class WholePinned:
    """RegionPinned's interface over one buffer pinned whole at once (`pinned_empty`, which may fall back to
    PyTorch's pinned allocator)."""

    all_pinned = True

    def __init__(self, nbytes: int) -> None:
        self.tensor = pinned_empty(nbytes)

    def pin(self, region: int) -> None:
        pass

    def pin_all(self) -> None:
        pass


def pool_buffer(nbytes: int, regions: int) -> RegionPinned | WholePinned:
    """Host memory the GPU reads in place, pinned region by region where the locked-memory limit allows all of it
    (else whole, the way that may still succeed under the limit)."""
    limit = memlock_limit()
    ok = limit is None or limit >= nbytes or _can_ignore_memlock()
    return RegionPinned(nbytes, regions) if ok else WholePinned(nbytes)


def _can_ignore_memlock() -> bool:
    """Whether this process holds CAP_IPC_LOCK (root usually does), which lifts RLIMIT_MEMLOCK (Linux)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 14 & 1)
    except OSError:
        pass
    return False
