"""The interface every KV tier implements (put, read_into, evict, nbytes) and the slot pool that memory tiers share.

A tier stores raw chunk bytes (flat uint8 of `chunk_bytes`) and knows nothing about placement; the TierManager
decides, the cache calls these methods in the order the manager's moves say.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Iterable

import torch

from tierkv.kv.storage.layout import ChunkId


class Tier(ABC):
    """Storage for sealed chunks. Not thread-safe for writes; reads may run on I/O threads between writes."""

    name: str
    chunk_bytes: int

    @abstractmethod
    def put(self, chunk: ChunkId, data: torch.Tensor) -> None:
        """Store a copy of data (uint8 (chunk_bytes,), any device). Mutates; blocks until data may be reused."""

    @abstractmethod
    def read_into(self, chunk: ChunkId, dest: torch.Tensor) -> None:
        """Copy the chunk's bytes into dest (uint8 (chunk_bytes,)). Mutates dest; blocks."""

    @abstractmethod
    def evict(self, chunk: ChunkId) -> None:
        """Forget the chunk and free its slot. Mutates."""

    _slot: dict[ChunkId, int]  # chunk -> slot number; every tier keeps one

    def __contains__(self, chunk: ChunkId) -> bool:
        return chunk in self._slot

    def __len__(self) -> int:
        return len(self._slot)

    @property
    def nbytes(self) -> int:
        """Bytes of chunks held now."""
        return len(self._slot) * self.chunk_bytes

    def close(self) -> None:
        """Release storage. Safe to call twice."""


class SlotPool(Tier):
    """Chunks in rows of one (slots, chunk_bytes) uint8 tensor; fixed size, or doubling when unbounded."""

    def __init__(self, chunk_bytes: int, max_slots: int | None, initial_slots: int) -> None:
        self.chunk_bytes, self.max_slots = chunk_bytes, max_slots
        rows = initial_slots if max_slots is None else min(max_slots, initial_slots)
        self.storage = self._alloc(max(rows, 1))  # (slots, chunk_bytes)
        self._slot: dict[ChunkId, int] = {}
        self._free = list(range(self.storage.shape[0] - 1, -1, -1))  # pop() hands out slot 0 first
        self.generation = 0  # bumps when storage is reallocated (views of it go stale)

    @abstractmethod
    def _alloc(self, rows: int) -> torch.Tensor:
        """A new uninitialised (rows, chunk_bytes) uint8 tensor in this tier's memory."""

    @property
    def capacity(self) -> int:
        return self.storage.shape[0]

    def _grow(self) -> None:
        limit = self.max_slots if self.max_slots is not None else 2 * self.capacity
        rows = min(2 * self.capacity, limit)
        if rows <= self.capacity:
            raise RuntimeError(f"{self.name} pool is full ({self.capacity} slots); the manager should have evicted")
        new = self._alloc(rows)
        new[: self.capacity].copy_(self.storage)
        self._free = list(range(rows - 1, self.capacity - 1, -1)) + self._free
        self.storage, self.generation = new, self.generation + 1

    def put(self, chunk: ChunkId, data: torch.Tensor) -> None:
        if chunk in self._slot:
            raise RuntimeError(f"chunk {tuple(chunk)} is already in the {self.name} tier")
        if not self._free:
            self._grow()
        slot = self._free.pop()
        self.storage[slot].copy_(data.reshape(-1))
        self._slot[chunk] = slot

    def read_into(self, chunk: ChunkId, dest: torch.Tensor) -> None:
        dest.reshape(-1).copy_(self.storage[self._slot[chunk]])

    def view(self, chunk: ChunkId) -> torch.Tensor:
        """The chunk's slot itself (uint8 (chunk_bytes,)); valid until the chunk is evicted or storage grows."""
        return self.storage[self._slot[chunk]]

    def slots_of(self, chunks: Iterable[ChunkId]) -> list[int]:
        """Slot row of each chunk, in order."""
        return [self._slot[c] for c in chunks]

    def evict(self, chunk: ChunkId) -> None:
        self._free.append(self._slot.pop(chunk))

    @property
    def reserved_bytes(self) -> int:
        """Bytes allocated for slots (used or not)."""
        return self.capacity * self.chunk_bytes

    def close(self) -> None:
        self.storage = self.storage.new_empty((0, self.chunk_bytes))
        self._slot.clear()
        self._free = []
