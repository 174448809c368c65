"""The sparse graph cache's steps with a disk tier (kv/placement/disk.py holds the chunks and slots): moving the oldest
chunks to disk after prefill, mapping picks to host rows, and the host work around a graph replay (install reads
ahead, book the step's picks, undo and redo a replay that missed a chunk on disk). A mixin of SparseKVCache:
it uses the cache's pool, plan and counters.
"""

from __future__ import annotations

import numpy as np
import torch

from tierkv.config import format_size
from tierkv.errors import BudgetError
from tierkv.kv.placement.disk import DISK_READ_THREADS, MISS, DiskChunks, write_disk_chunks
from tierkv.kv.storage.resident import ResidentChunks
from tierkv.kv.storage.disk import DiskStore

# a replay that missed at most this many picks on disk is replayed again once they are read; more (picks spread
# evenly, as random weights make them) and the step runs eagerly: later layers would miss again
REPLAY_MISSES = 32


class DiskTierSteps:
    """SparseKVCache's disk-tier methods; `disk_chunks` is None until `_spill_to_disk` moves chunks to disk."""

    disk_chunks: DiskChunks | None = None
    _redo = False  # the last replay missed a chunk on disk (`redo_step`)

    def _disk_slots(self) -> int:
        """Host slots per layer for chunks on disk: two steps of picks, were they all on disk."""
        return 2 * self.hkv * self.max_picks

    def _min_disk_host(self) -> int:
        """Host bytes of the sink, window and open chunks plus the disk tier's slots: the least cpu_budget."""
        return (self.sink_chunks + self.window_chunks + 1 + self._disk_slots()) * 2 * self._chunk_bytes()

    def _spill_to_disk(self, total: int) -> None:
        """When the pool exceeds cpu_budget (with a disk_dir): move chunks [sinks, hi) of every layer to disk, keep
        `slots` host rows per layer caching them (first the newest of them) and compact the pool to the budget.
        Eager; blocks on the disk writes."""
        cfg, c = self.config, self.chunk
        if cfg.disk_dir is None or cfg.cpu_budget is None or self.host_bytes <= cfg.cpu_budget:
            return
        per_chunk = 2 * self._chunk_bytes()  # K and V of one chunk in every layer
        slots = self._disk_slots()
        lo = self.sink_chunks
        hi = lo + self.n_chunks - cfg.cpu_budget // per_chunk + slots
        last = total // c - self.window_chunks
        if hi > last:
            need = (self.n_chunks - (last - lo) + slots) * per_chunk
            raise BudgetError(f"cpu_budget={format_size(cfg.cpu_budget)} is below the {format_size(need)} of host "
                              f"memory the sparse cache needs for {self.capacity} tokens with the rest on disk; "
                              f"raise cpu_budget")
        if self.res.n and self.res.start < hi:  # resident copies hold a suffix: keep the part after the disk region
            keys = self.res.k is not None
            self.res = None
            self.res = ResidentChunks(self.pool_shape, self.n_chunks - hi, keys=keys, device=self.device,
                                      dtype=self.dtype)
            self.res.copy_from(self.k_host, self.v_host, total)
        old = [h.view(self.num_layers, self.n_chunks, -1) for h in self._host]  # (L, N, row bytes) per K, V
        store = DiskStore(2 * old[0].shape[-1], cfg.disk_dir, threads=DISK_READ_THREADS)
        write_disk_chunks(store, old[0].numpy(), old[1].numpy(), lo, hi)
        store.drop_page_cache()  # later reads come from the disk, not from RAM the budget does not count
        self._set_pool((self.num_layers, self.n_chunks - (hi - lo) + slots, c, self.hkv, self.d))
        rows = [h.view(self.num_layers, -1, old[0].shape[-1]) for h in self._host]  # (L, rows, row bytes)
        for src, dst in zip(old, rows):
            dst[:, :lo].copy_(src[:, :lo])
            dst[:, lo:lo + slots].copy_(src[:, hi - slots:hi])  # the slots start with the newest chunks on disk
            dst[:, lo + slots:].copy_(src[:, hi:])
        del old
        self.disk_chunks = DiskChunks(store, rows[0].numpy(), rows[1].numpy(), lo, hi, slots, self.n_chunks,
                                      self.device, threads=DISK_READ_THREADS)
        self.disk_chunks.preload(np.arange(hi - slots, hi))
        self._disk_pick = torch.full((self.num_layers, self.hkv, self.max_picks), -1, dtype=torch.long,
                                     device=self.device)

    def _unspill(self, keep: int) -> None:
        """Bring the chunks on disk that hold positions < keep back into a whole host pool and drop the disk tier (a
        rollback that discards the fit: the refit spills again). Host memory exceeds cpu_budget until then. Blocks
        on reads."""
        dc, shape = self.disk_chunks, (self.num_layers, self.n_chunks, self.chunk, self.hkv, self.d)
        old = [h.view(self.num_layers, -1, dc.row_bytes) for h in self._host]  # compact rows
        self._set_pool(shape)
        rows = [h.view(self.num_layers, self.n_chunks, -1) for h in self._host]
        for src, dst in zip(old, rows):
            dst[:, :dc.lo].copy_(src[:, :dc.lo])
            dst[:, dc.hi:].copy_(src[:, dc.lo + dc.slots:])
        del old
        back = range(dc.lo, min(dc.hi, -(-keep // self.chunk)))
        for layer in range(self.num_layers):
            for cid, buf in zip(back, dc.read_chunks(layer, back)):
                rows[0][layer, cid] = torch.from_numpy(buf[:dc.row_bytes])
                rows[1][layer, cid] = torch.from_numpy(buf[dc.row_bytes:])
        dc.close()
        self.disk_chunks = None

    @property
    def row_shift(self) -> int:
        """Token offset of positions after the disk region in the (compacted) host pool."""
        return 0 if self.disk_chunks is None else self.disk_chunks.shift * self.chunk

    def _disk_rows(self, layer: int, slots: torch.Tensor, lengths: torch.Tensor, f: int):
        """Chunk ids -> host-pool rows. Picks on disk are noted for the step's bookkeeping; eagerly, the ones not
        in a host slot are read from disk first (one host sync); in a graph they attend nothing (length 0) and
        the step is redone (`redo_step`)."""
        dc = self.disk_chunks
        rows = dc.row_map[layer][slots]  # (Hkv, F + K)
        on_disk = (lengths > 0) & (slots >= dc.lo) & (slots < dc.hi)
        self._disk_pick[layer].copy_(torch.where(on_disk[:, f:], slots[:, f:], -1))
        if not capturing():
            if bool((on_disk & (rows == MISS)).any()):
                dc.serve(layer, slots[on_disk].cpu().numpy())
                rows = dc.row_map[layer][slots]
        missing = rows == MISS
        return torch.where(missing, 0, rows), torch.where(missing, 0, lengths)

    def before_replay(self) -> None:
        """Host work before a graph replay: install finished reads ahead, remember the counters (a replay that
        missed a chunk on disk is undone)."""
        if self.disk_chunks is not None:
            self.disk_chunks.begin_step()
            self._counts_before = self.read_counts.clone()

    def after_replay(self, n: int) -> None:
        self.seq_len += n
        self._redo = self.disk_chunks is not None and self._book_disk_picks(replayed=True)

    def redo_step(self) -> str | None:
        """After a replay that attended without a chunk on disk missing from the host: undo it (position, counters),
        and say how to redo it: "replay" after reading the few chunks it missed (picks after the first missing
        layer may still change, but rarely) or "eager" when it missed many (the eager step reads each miss first).
        None when the replay lacked nothing."""
        if not self._redo:
            return None
        self._redo = False
        self.seq_len -= 1
        self.pos.sub_(1)
        self.read_counts.copy_(self._counts_before)
        self.disk_chunks.n["steps_redone"] += 1
        picked, layer_of = self._missed
        layers = np.unique(layer_of)
        misses = sum(int((~self.disk_chunks.cached(layer, picked[layer_of == layer])).sum()) for layer in layers)
        if misses > REPLAY_MISSES:  # the eager step reads what it needs (this replay's later picks were off-path)
            return "eager"
        for layer in layers:
            self.disk_chunks.serve(int(layer), picked[layer_of == layer])
        return "replay"

    def _book_disk_picks(self, replayed: bool) -> bool:
        """Read the step's picks on disk (one small copy, a host sync). A replay with a miss is not booked and
        returns True (its picks kept for `redo_step`); otherwise LRU times and reads ahead are booked."""
        picks = self._disk_pick.cpu().numpy()  # (L, Hkv, K)
        layer_of = np.nonzero(picks >= 0)[0]
        picked = picks[picks >= 0]
        if replayed and self.disk_chunks.missing(picked, layer_of):
            self._missed = picked, layer_of
            return True
        self.disk_chunks.end_step(picked, layer_of)
        return False


def capturing() -> bool:
    """Whether the current CUDA stream is being captured into a graph (host decisions are not allowed then)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
