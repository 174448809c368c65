"""TierManager: where every sealed KV chunk lives (device, host, disk), per-tier slot budgets and hit counts.

Metadata only: it holds chunk ids, never tensors. It answers each event (a chunk sealed, chunks accessed)
with move orders that the cache executes in the order given. Eviction goes through a replaceable policy.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Sequence

from tierkv.config import format_size
from tierkv.errors import BudgetError
from tierkv.kv.storage.layout import ChunkId, ChunkLayout

DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (DEVICE, HOST, DISK)


class Move(NamedTuple):
    """Move `chunk` from tier src to tier dst; src None: a new chunk from the open buffer; dst None: drop it."""

    chunk: ChunkId
    src: str | None
    dst: str | None


@dataclass(frozen=True)
class TierBudgets:
    """Chunk slots per tier; None means unbounded."""

    device: int | None
    host: int | None
    disk: int | None = None

    def of(self, tier: str) -> int | None:
        return getattr(self, tier)


class EvictionPolicy(ABC):
    """Chooses which chunk leaves a full tier. The manager reports every insert, removal and access."""

    @abstractmethod
    def insert(self, chunk: ChunkId, tier: str) -> None: ...

    @abstractmethod
    def remove(self, chunk: ChunkId, tier: str) -> None: ...

    @abstractmethod
    def touch(self, chunk: ChunkId, tier: str) -> None: ...

    @abstractmethod
    def victim(self, tier: str, protected: Callable[[ChunkId], bool]) -> ChunkId | None:
        """The chunk of `tier` to evict next, skipping protected ones; None if every chunk is protected."""

    def observe_scores(self, chunks: Sequence[ChunkId], scores: Sequence[float]) -> None:
        """Attention mass per chunk from the last step; LRU ignores it, score-aware policies use it."""


class LRUPolicy(EvictionPolicy):
    """Least recently inserted or accessed chunk goes first; O(1) updates, one ordered dict per tier."""

    def __init__(self) -> None:
        self._order: dict[str, OrderedDict[ChunkId, None]] = {t: OrderedDict() for t in TIERS}

    def insert(self, chunk: ChunkId, tier: str) -> None:
        self._order[tier][chunk] = None

    def remove(self, chunk: ChunkId, tier: str) -> None:
        self._order[tier].pop(chunk, None)

    def touch(self, chunk: ChunkId, tier: str) -> None:
        self._order[tier].move_to_end(chunk)

    def victim(self, tier: str, protected: Callable[[ChunkId], bool]) -> ChunkId | None:
        for chunk in self._order[tier]:  # oldest first; pinned sinks are skipped cheaply
            if not protected(chunk):
                return chunk
        return None


class TierManager:
    """Placement (device first, then host, then disk), promotion, eviction and accounting of chunks.

    Pinned chunks (the first `sink_tokens` and the newest `window_tokens` of every layer) stay on the device.
    Not thread-safe; call from the thread that drives the cache.
    """

    def __init__(self, layout: ChunkLayout, budgets: TierBudgets, *, sink_tokens: int = 0,
                 window_tokens: int = 0, policy: EvictionPolicy | None = None) -> None:
        self.layout, self.budgets = layout, budgets
        self.policy = policy if policy is not None else LRUPolicy()
        self.sink_n = layout.sink_chunks(sink_tokens)
        self.window_n = layout.window_chunks(window_tokens)
        self._where: dict[ChunkId, str] = {}
        self._count = {t: 0 for t in TIERS}
        self._sealed = [0] * layout.num_layers
        self.hits = {t: 0 for t in TIERS}
        need = layout.num_layers * (self.sink_n + self.window_n)
        if budgets.device is not None and budgets.device < need:
            raise BudgetError(
                f"the KV GPU budget holds {budgets.device} chunks of {format_size(layout.chunk_bytes)} but sinks and "
                f"window need {need} ({format_size(need * layout.chunk_bytes)}); raise kv_gpu_budget or lower "
                f"sink_tokens/window_tokens")

    # ---- queries -------------------------------------------------------------------------------------
    def tier_of(self, chunk: ChunkId) -> str:
        """The tier holding chunk (KeyError if unknown)."""
        return self._where[chunk]

    def __contains__(self, chunk: ChunkId) -> bool:
        return chunk in self._where

    def sealed(self, layer: int) -> int:
        """Number of sealed chunks of layer (indices 0 .. sealed-1)."""
        return self._sealed[layer]

    def chunks_in(self, tier: str) -> list[ChunkId]:
        return [c for c, t in self._where.items() if t == tier]

    def used_slots(self, tier: str) -> int:
        return self._count[tier]

    def used_bytes(self, tier: str) -> int:
        return self._count[tier] * self.layout.chunk_bytes

    def has_room(self, tier: str) -> bool:
        cap = self.budgets.of(tier)
        return cap is None or self._count[tier] < cap

    def is_pinned(self, chunk: ChunkId) -> bool:
        """Sinks and the local window stay on the device."""
        return chunk.index < self.sink_n or chunk.index >= self._sealed[chunk.layer] - self.window_n

    # ---- events --------------------------------------------------------------------------------------
    def add(self, chunk: ChunkId) -> list[Move]:
        """A chunk was just sealed (in the open buffer on the device): place it. Mutates; returns moves.

        Chunks must be sealed in order per layer. The last move is (chunk, None, tier chosen).
        """
        if chunk.index != self._sealed[chunk.layer]:
            raise ValueError(f"chunk {chunk} sealed out of order; layer has {self._sealed[chunk.layer]} chunks")
        self._sealed[chunk.layer] += 1
        moves: list[Move] = []
        self._place(chunk, None, 0, moves, frozenset())
        return moves

    def access(self, chunks: Iterable[ChunkId], *, promote: bool = False) -> list[Move]:
        """Record that a step read these chunks (hit counts, recency); with promote, pull them up to the device.

        Mutates. Promotion evicts by policy but never evicts one of `chunks` in the same call.
        """
        chunks = list(chunks)
        for c in chunks:
            tier = self._where[c]
            self.hits[tier] += 1
            self.policy.touch(c, tier)
        if not promote:
            return []
        moves: list[Move] = []
        keep = frozenset(chunks)
        for c in chunks:
            src = self._where[c]
            if src != DEVICE:
                self._place(c, src, 0, moves, keep, stop=TIERS.index(src))
        return moves

    def record_hits(self, counts: dict[str, int]) -> None:
        """Count reads per tier without touching recency (a step that reads every chunk). Mutates."""
        for tier, n in counts.items():
            self.hits[tier] += n

    def drop(self, chunk: ChunkId) -> list[Move]:
        """Forget a chunk (e.g. a truncated session). Mutates; returns [(chunk, tier, None)]."""
        tier = self._where.pop(chunk)
        self._count[tier] -= 1
        self.policy.remove(chunk, tier)
        return [Move(chunk, tier, None)]

    def truncate(self, layer: int, keep: int) -> list[Move]:
        """Forget layer's chunks with index >= keep (a rolled-back session). Mutates; returns drop moves."""
        moves: list[Move] = []
        for index in range(keep, self._sealed[layer]):
            if ChunkId(layer, index) in self._where:
                moves += self.drop(ChunkId(layer, index))
        self._sealed[layer] = min(self._sealed[layer], keep)
        return moves

    def undo(self, moves: Sequence[Move]) -> None:
        """Forget moves this manager ordered (the tiers could not carry them out), newest first: each chunk is
        recorded where it was before; a chunk new from the open buffer is unsealed again; drops stay done (their
        bytes are gone). Mutates."""
        for m in reversed(moves):
            if m.dst is None:
                continue
            del self._where[m.chunk]
            self._count[m.dst] -= 1
            self.policy.remove(m.chunk, m.dst)
            if m.src is not None:
                self._where[m.chunk] = m.src
                self._count[m.src] += 1
                self.policy.insert(m.chunk, m.src)
            elif self._sealed[m.chunk.layer] == m.chunk.index + 1:
                self._sealed[m.chunk.layer] -= 1

    def observe_scores(self, chunks: Sequence[ChunkId], scores: Sequence[float]) -> None:
        """Hand attention scores to the eviction policy."""
        self.policy.observe_scores(chunks, scores)

    # ---- placement -----------------------------------------------------------------------------------
    def _place(self, chunk: ChunkId, src: str | None, start: int, moves: list[Move], keep: frozenset,
               stop: int = len(TIERS)) -> bool:
        """Put chunk in the first tier in TIERS[start:stop] that has (or can make) room; False if none can."""
        for tier in TIERS[start:stop]:
            if self._make_room(tier, moves, keep | {chunk}):
                if src is not None:
                    self._count[src] -= 1
                    self.policy.remove(chunk, src)
                self._where[chunk] = tier
                self._count[tier] += 1
                self.policy.insert(chunk, tier)
                moves.append(Move(chunk, src, tier))
                return True
        if stop < len(TIERS):
            return False  # a promotion that found no room: the chunk stays where it is
        raise BudgetError(f"no tier has room for KV chunk {tuple(chunk)}: every budget is full; raise "
                          f"kv_gpu_budget/cpu_budget or give the disk tier a disk_dir with free space")

    def _make_room(self, tier: str, moves: list[Move], keep: frozenset) -> bool:
        """Free one slot in tier by demoting a policy victim one tier down (recursively). Mutates."""
        if self.has_room(tier):
            return True
        if self.budgets.of(tier) == 0 or tier == TIERS[-1]:
            return False

        def protected(c: ChunkId) -> bool:
            return c in keep or (tier == DEVICE and self.is_pinned(c))

        victim = self.policy.victim(tier, protected)
        if victim is None:
            return False
        return self._place(victim, tier, TIERS.index(tier) + 1, moves, keep)

    def stats(self) -> dict:
        """Chunks, bytes, budgets (bytes, None = unbounded) and hit counts/rates per tier. Does not mutate."""
        total = sum(self.hits.values())
        cb = self.layout.chunk_bytes
        return {
            "chunks": dict(self._count),
            "bytes": {t: self._count[t] * cb for t in TIERS},
            "budget_bytes": {t: (None if self.budgets.of(t) is None else self.budgets.of(t) * cb) for t in TIERS},
            "hits": dict(self.hits),
            "hit_rate": {t: (self.hits[t] / total if total else 0.0) for t in TIERS},
        }
