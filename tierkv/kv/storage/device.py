"""Device tier: chunk slots preallocated on the compute device, as many as the KV GPU budget allows."""

from __future__ import annotations

import torch

from tierkv.kv.storage.base import SlotPool


class DevicePool(SlotPool):
    """`slots` rows of chunk bytes on `device`, all allocated up front; slots=None grows by doubling."""

    name = "device"

    def __init__(self, chunk_bytes: int, slots: int | None, device: torch.device | str) -> None:
        self.device = torch.device(device)
        super().__init__(chunk_bytes, slots, initial_slots=slots if slots is not None else 64)

    def _alloc(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.chunk_bytes), dtype=torch.uint8, device=self.device)
