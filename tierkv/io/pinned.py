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
    """An anonymous mapping that CUDA has page-locked; unregistered just before it is unmapped."""

    registered_ptr = 0

    def __del__(self) -> None:
        if self.registered_ptr:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.registered_ptr)
            except Exception:  # at interpreter exit CUDA may be gone; the process's memory goes with it
                pass
            self.registered_ptr = 0


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
    mem.registered_ptr = t.data_ptr()
    return t


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
