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


def split_block_n(device: torch.device, d: int, elt: int, stage_factor: int, extra=None,
                  sizes: tuple[int, ...] = (64, 32)) -> int | None:
    """Keys per block of a split kernel: the first of `sizes` whose staged tiles fit the GPU's shared memory: about
    `stage_factor` x block x D x `elt` bytes for K and V, plus `extra(block)` bytes (the shadow kernel's
    basis). 32 instead of 64 at head dim 256 (Gemma 3) on an H100, or head dim 128 on a card with ~100 KiB per
    SM. None where no size fits: the caller runs the torch reference (the shadow kernel in fp32 at head dim 256 did
    not fit an H100 at 16 keys). Measured on an H100 at 64 x 256: 258,560 bytes for the shadow kernel in bf16
    (factor 8), 282,688 for the dense one in fp32 (5)."""
    limit = _shared_memory_limit(device)
    for block_n in sizes:
        if stage_factor * block_n * d * elt + (extra(block_n) if extra else 0) <= limit:
            return block_n
    return None


# shared bytes per (key x D x element) of the shadow split kernel's K/V tiles (kernels/shadow_attention_triton.py)
SHADOW_STAGE_FACTOR = 8


def rank_step(block_r: int) -> int:
    """Basis rows per rebuild dot of the shadow kernel: all of them up to 64; above, 32-row slices (the whole basis
    spilled with fp32 dots; with 16-bit dots both forms time the same on the H100 at rank 96, so one form is kept)."""
    return block_r if block_r <= 64 else 32


def shadow_split_block_n(device: torch.device, d: int, rank: int, elt: int) -> int | None:
    """Keys per block of the shadow split kernel at head dim `d`, shadow `rank` and `elt`-byte tiles, or None.
    Triton stages the basis (its rows padded to a power of two, x D) on top of the K/V tiles: at head dim 256 and
    rank 256 (narrow-key models' exact keys) 32-key blocks compile to ~263 KB for an H100, over its 227 KiB, so
    they take 16 (bench/kernel_shared_memory.py). The estimate leaves out the coefficient tiles, which is close at
    head dim 128 (99 KB compiled for sm_89 at 32 keys, 98 KB estimated) but low at head dim 64 (SmolLM2 at 64
    keys: 123 KB compiled for sm_89, 98 KB estimated); the kernel's launch retries smaller where it was low."""
    block_r = max(16, 1 << (rank - 1).bit_length())
    return split_block_n(device, d, elt, SHADOW_STAGE_FACTOR, lambda block_n: block_r * d * elt, sizes=(64, 32, 16))
