"""Host tier: chunk slots in pinned CPU memory (plain memory where torch cannot pin), capped by the CPU budget.

It also gives the GPU a view of its slots through pinned memory's mapped device address (UVA), so a kernel
on the GPU can gather host chunks in place; `mapped_view` returns None where that is impossible.
"""

from __future__ import annotations

import psutil
import torch

from tierkv.config import format_size
from tierkv.errors import BudgetError
from tierkv.io.pinned import memlock_limit, unpinned_fallback
from tierkv.io.staging import alloc_host, pinning_available
from tierkv.kv.storage.base import SlotPool

GROW_BYTES = 64 * 1024**2  # first allocation; doubles up to the budget, so a small run pins little


def check_host_budget(nbytes: int, name: str = "cpu_budget") -> None:
    """Raise BudgetError when nbytes is more than the memory available right now (psutil)."""
    avail = psutil.virtual_memory().available
    if nbytes > avail:
        raise BudgetError(f"{name}={format_size(nbytes)} is more than the {format_size(avail)} of memory available; "
                          f"lower {name} to at most {format_size(int(avail * 0.8))} or free memory")


class HostPool(SlotPool):
    """Up to `slots` chunk rows in host memory; `mode` is 'pinned' or 'pageable' (decided once, shown in stats)."""

    name = "host"

    def __init__(self, chunk_bytes: int, slots: int | None, *, pin: bool | None = None) -> None:
        self.pinned = pinning_available() if pin is None else pin
        self.pin_note = ""  # why a pool meant to be pinned is pageable ('' when it is as asked)
        if slots is not None:
            check_host_budget(slots * chunk_bytes)
        self._mapped: tuple[int, torch.Tensor] | None = None
        self._growing = False
        super().__init__(chunk_bytes, slots, initial_slots=max(1, GROW_BYTES // chunk_bytes))
        self._growing = True

    @property
    def mode(self) -> str:
        """'pinned', 'pageable', or 'pageable-fallback' when pinning failed (pin_note says why)."""
        return "pinned" if self.pinned else "pageable-fallback" if self.pin_note else "pageable"

    def _alloc(self, rows: int) -> torch.Tensor:
        nbytes = rows * self.chunk_bytes
        if self.pinned:
            try:
                return alloc_host(nbytes, pin=True).view(rows, self.chunk_bytes)
            except RuntimeError as e:  # e.g. the locked-memory limit: fall back at first, stop when growing
                self.pin_note = unpinned_fallback(nbytes, e, growing=self._growing, limit=memlock_limit())
                self.pinned = False
        return alloc_host(nbytes, pin=False).view(rows, self.chunk_bytes)

    def mapped_view(self, device: torch.device) -> torch.Tensor | None:
        """A tensor on `device` aliasing this pool's storage (slots, chunk_bytes), or None if unsupported.

        CPU device: the storage itself. CUDA: pinned memory's device-mapped address (same pointer under UVA),
        wrapped through __cuda_array_interface__; valid until the pool grows (check `generation`).
        """
        if device.type == "cpu":
            return self.storage
        if device.type != "cuda" or not self.pinned:
            return None
        if self._mapped is None or self._mapped[0] != self.generation:
            self._mapped = (self.generation, map_pinned(self.storage, device))
        return self._mapped[1]

    def close(self) -> None:
        self._mapped = None
        super().close()


class _CudaArrayInterface:
    """Describes a pinned host tensor as device memory; keeps the tensor alive while the view exists."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t
        self.__cuda_array_interface__ = {
            "shape": tuple(t.shape), "typestr": "|u1", "data": (t.data_ptr(), False),
            "version": 3, "strides": None, "stream": None,
        }


def map_pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor reading the pinned uint8 tensor t in place (zero-copy over the host link). Does not copy."""
    if t.dtype != torch.uint8 or not t.is_contiguous() or not t.is_pinned():
        raise ValueError("map_pinned needs a contiguous pinned uint8 tensor")
    with torch.cuda.device(device):
        view = torch.as_tensor(_CudaArrayInterface(t), device=device)
    if view.data_ptr() != t.data_ptr():  # torch copied instead of aliasing: reads would be stale
        raise ValueError("torch copied the pinned buffer instead of mapping it")
    return view


def probe_mapped_read(device: torch.device) -> bool:
    """True when a GPU gather through a mapped pinned view returns the right bytes on this machine. Blocks."""
    if device.type != "cuda" or not pinning_available():
        return False
    try:
        host = alloc_host(4096, pin=True).view(16, 256)
        host.copy_(torch.arange(4096, dtype=torch.int64).remainder(251).to(torch.uint8).view(16, 256))
        idx = torch.tensor([3, 0, 15], device=device)
        view = map_pinned(host, device)
        host[0].fill_(7)  # written after mapping: an in-place view must see it
        got = view.index_select(0, idx).cpu()
        return bool(torch.equal(got, host[[3, 0, 15]]))
    except (RuntimeError, TypeError, ValueError):
        return False
