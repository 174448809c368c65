"""Chunk layout of the tiered KV cache: chunk ids, token ranges and byte sizes.

Per layer, K and V are cut into sealed chunks of `chunk_size` tokens. A chunk's K and V bytes are one
contiguous (2, chunk_size, Hkv, D) block in every tier, so one copy moves it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from tierkv.errors import ConfigError


class ChunkId(NamedTuple):
    """Stable id of a sealed chunk: its layer and its index along the sequence (tokens index*C .. +C)."""

    layer: int
    index: int


@dataclass(frozen=True)
class ChunkLayout:
    """Shape and byte size of one chunk; pure arithmetic, no tensors."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    chunk_size: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "chunk_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ConfigError(f"{name}={v!r} must be a positive integer")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """One chunk: (2, C, Hkv, D), K at [0] and V at [1]."""
        return (2, self.chunk_size, self.num_kv_heads, self.head_dim)

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def token_bytes(self) -> int:
        """K and V bytes of one token of one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.elem_bytes

    @property
    def chunk_bytes(self) -> int:
        return self.chunk_size * self.token_bytes

    def chunk_of(self, pos: int) -> int:
        """Index of the chunk holding token position pos."""
        return pos // self.chunk_size

    def token_range(self, index: int) -> tuple[int, int]:
        """Token positions [start, end) of chunk `index`."""
        return index * self.chunk_size, (index + 1) * self.chunk_size

    def chunks_covering(self, num_tokens: int) -> int:
        """How many chunks (full or partial) hold positions [0, num_tokens)."""
        return -(-num_tokens // self.chunk_size)

    def sink_chunks(self, sink_tokens: int) -> int:
        """Chunks pinned as attention sinks: those holding any of the first sink_tokens positions."""
        return self.chunks_covering(sink_tokens)

    def window_chunks(self, window_tokens: int) -> int:
        """Newest sealed chunks pinned as the local window (the open chunk holds the rest)."""
        return self.chunks_covering(window_tokens)
