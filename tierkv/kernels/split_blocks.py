"""Keys per block of the split-K attention kernels, from the GPU's shared memory (no Triton import: the CPU
tests check the arithmetic)."""

from __future__ import annotations

import torch

_LIMITS: dict[int, int] = {}  # per CUDA device index; asked on every launch of an eager decode step


def _shared_memory_limit(device: torch.device) -> int:
    """Shared memory one program may opt into on `device`: the SM's, less the 1 KiB the driver keeps (Triton's
    limit: 232,448 bytes on an H100, 101,376 on an RTX 4090). No limit in the CPU interpreter."""
    if device.type != "cuda":
        return 1 << 30
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _LIMITS:
        _LIMITS[index] = torch.cuda.get_device_properties(index).shared_memory_per_multiprocessor - 1024
    return _LIMITS[index]


def split_block_n(device: torch.device, d: int, elt: int, stage_factor: int) -> int | None:
    """Keys per block of a split kernel: 64, or 32 where the K and V tiles Triton stages (about `stage_factor`
    x block x D x `elt` bytes) would not fit the GPU's shared memory: head dim 256 (Gemma 3) on an H100, or head
    dim 128 on a card with ~100 KiB per SM. None where 32 does not fit either: the caller runs the torch
    reference (the shadow kernel in fp32 at head dim 256 did not fit an H100 at 16 keys). Measured on an H100 at
    64 x 256: 258,560 bytes for the shadow kernel in bf16 (factor 8), 282,688 for the dense one in fp32 (5)."""
    limit = _shared_memory_limit(device)
    for block_n in (64, 32):
        if stage_factor * block_n * d * elt <= limit:
            return block_n
    return None
