"""Chunks of the sparse graph cache on disk: the oldest chunks' K and V on disk, a few host slots caching them.

When cpu_budget cannot hold every chunk, the graph cache moves chunks [lo, hi) (after the sinks: on real text
the fewest picks land there) to a DiskStore after prefill and keeps `slots` host rows per layer for them.
`row_map` (L, N) on the device turns chunk ids into host-pool rows: hot chunks have fixed rows, chunks on disk the
row of their slot or MISS. Misses are read from disk (on many threads) before the step's attention uses them;
neighbours of picked chunks on disk are read ahead on a thread pool and installed between steps.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from tierkv.config import format_size
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore

MISS = -1
READ_AHEAD = 1  # neighbours on each side of a picked chunk on disk that are read ahead
DISK_READ_THREADS = 8  # scattered 64-KiB reads peak at 8-16 threads on the H100 machine's disk (DESIGN.md)
MAX_AHEAD = 256  # reads ahead in flight at most: with picks spread evenly they would queue without end


def write_disk_chunks(store: DiskStore, k_rows: np.ndarray, v_rows: np.ndarray, lo: int, hi: int) -> None:
    """Write chunks [lo, hi) of every layer, K bytes then V bytes, as one record each. Blocks."""
    buf = np.empty(2 * k_rows.shape[-1], dtype=np.uint8)
    half = k_rows.shape[-1]
    for layer in range(k_rows.shape[0]):
        for c in range(lo, hi):
            buf[:half], buf[half:] = k_rows[layer, c], v_rows[layer, c]
            store.put(ChunkId(layer, c), torch.from_numpy(buf))


class DiskChunks:
    """Chunks [lo, hi) of every layer on disk; `slots` host rows per layer (pool rows lo .. lo + slots) cache them.

    k_rows/v_rows: (L, R, row_bytes) uint8 numpy views of the compact host pool (R rows: [0, lo) the chunks
    before the disk region, [lo, lo + slots) the cache slots, then chunks [hi, N)). Host-side decisions only;
    every method runs between GPU steps or inside an eager one.
    """

    def __init__(self, store: DiskStore, k_rows: np.ndarray, v_rows: np.ndarray, lo: int, hi: int, slots: int,
                 n_chunks: int, device: torch.device, *, threads: int = 8) -> None:
        self.store, self.k_rows, self.v_rows = store, k_rows, v_rows
        self.lo, self.hi, self.slots, self.n_chunks = lo, hi, slots, n_chunks
        self.layers, self.row_bytes = k_rows.shape[0], k_rows.shape[2]
        self.shift = hi - lo - slots  # a hot chunk c >= hi lives in pool row c - shift
        rows = np.arange(n_chunks, dtype=np.int64)
        rows = np.where(rows >= hi, rows - self.shift, np.where(rows < lo, rows, MISS))
        self.row_map = torch.as_tensor(np.tile(rows, (self.layers, 1))).to(device)  # (L, N) int64
        self.slot_cid = np.full((self.layers, slots), -1, dtype=np.int64)  # which on-disk chunk each slot holds
        self.slot_used = np.zeros((self.layers, slots), dtype=np.int64)  # step it was last picked (LRU)
        self.slot_ahead = np.zeros((self.layers, slots), dtype=bool)  # read ahead, not yet picked
        self.step = 0
        # misses block a step: their reads never queue behind reads ahead, which have their own threads
        self.pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="tierkv-disk")
        self.ahead_pool = ThreadPoolExecutor(max_workers=max(1, threads // 2), thread_name_prefix="tierkv-ahead")
        self.ahead: dict[tuple[int, int], Future] = {}
        self.n = {"picks": 0, "missed": 0, "disk_reads": 0, "read_s": 0.0, "ahead_issued": 0, "ahead_installed": 0,
                  "ahead_used": 0, "steps_redone": 0}

    # ---- lookups ------------------------------------------------------------------------------------
    def cached(self, layer: int, cids: np.ndarray) -> np.ndarray:
        """Bool mask: which on-disk chunk ids of the layer sit in a host slot now."""
        return np.isin(cids, self.slot_cid[layer])

    def _row_bytes(self, layer: int, cid: int) -> np.ndarray:
        buf = np.empty(2 * self.row_bytes, dtype=np.uint8)
        self.store.read_into(ChunkId(layer, cid), buf)
        return buf

    def read_chunks(self, layer: int, cids: range) -> list[np.ndarray]:
        """K bytes then V bytes of each chunk, read from disk on the thread pool (the disk is the truth: slots
        only cache it). Blocks."""
        return list(self.pool.map(lambda c: self._row_bytes(layer, c), cids))

    def read_tokens(self, layer: int, start: int, end: int, dtype: torch.dtype,
                    heads_dim: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (T, Hkv, D) on the host of positions [start, end) inside the disk region. Blocks on reads."""
        c = self.row_bytes // (heads_dim[0] * heads_dim[1] * dtype.itemsize)  # tokens per chunk
        first = start // c
        rows = np.stack(self.read_chunks(layer, range(first, -(-end // c))))  # (n, 2 * row_bytes)
        kv = torch.from_numpy(rows).view(dtype).view(rows.shape[0], 2, c, *heads_dim)
        a, b = start - first * c, end - first * c
        return (kv[:, i].reshape(-1, *heads_dim)[a:b] for i in (0, 1))

    def preload(self, cids: np.ndarray) -> None:
        """Record that slot i of every layer already holds on-disk chunk cids[i] (the pool was filled so)."""
        self.slot_cid[:, :len(cids)] = cids
        rows = torch.as_tensor(self.lo + np.arange(len(cids)), device=self.row_map.device)
        self.row_map[:, torch.as_tensor(cids, device=self.row_map.device)] = rows

    # ---- filling slots --------------------------------------------------------------------------------
    def serve(self, layer: int, entries: np.ndarray) -> int:
        """Make the chunks on disk of a layer's picked entries (one per head and pick) resident in its slots, reading
        misses from disk on the thread pool (or taking a read ahead in flight); never evicts one of them. Counts
        the entries that missed. Returns the chunks read. Blocks; mutates row_map."""
        cids = np.unique(entries)
        if cids.size > self.slots:
            raise RuntimeError(f"a step picks {cids.size} chunks on disk in layer {layer}; the host holds {self.slots}")
        self.n["missed"] += int((~self.cached(layer, entries)).sum())
        need = cids[~self.cached(layer, cids)]
        if need.size == 0:
            return 0
        t0 = time.perf_counter()
        reads = [self.ahead.pop((layer, int(c)), None) or self.pool.submit(self._row_bytes, layer, int(c))
                 for c in need]
        self._install(layer, need, [r.result() for r in reads], protect=cids)
        self.n["read_s"] += time.perf_counter() - t0
        self.n["disk_reads"] += int(need.size)
        return int(need.size)

    def _install(self, layer: int, cids: np.ndarray, data: list[np.ndarray], protect: np.ndarray,
                 ahead: bool = False) -> None:
        """Put each chunk's bytes into the least recently picked slots not holding a `protect` chunk."""
        order = np.argsort(self.slot_used[layer], kind="stable")  # free and least recently picked first
        order = order[~np.isin(self.slot_cid[layer, order], protect)][:len(cids)]
        old = self.slot_cid[layer, order]
        for slot, buf in zip(order, data):
            self.k_rows[layer, self.lo + slot] = buf[:self.row_bytes]
            self.v_rows[layer, self.lo + slot] = buf[self.row_bytes:]
        self.slot_cid[layer, order] = cids[:len(order)]
        self.slot_used[layer, order] = self.step
        self.slot_ahead[layer, order] = ahead
        idx = torch.as_tensor(np.concatenate([old[old >= 0], cids[:len(order)]]))
        val = torch.as_tensor(np.concatenate([np.full(int((old >= 0).sum()), MISS), self.lo + order]))
        self.row_map[layer].index_put_((idx.to(self.row_map.device),), val.to(self.row_map.device))

    # ---- per step ---------------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Install the reads ahead that finished (the GPU is idle between steps). Mutates row_map."""
        self.step += 1
        done = [key for key, f in self.ahead.items() if f.done()]
        by_layer: dict[int, list[int]] = {}
        for layer, cid in done:
            by_layer.setdefault(layer, []).append(cid)
        for layer, cids in by_layer.items():
            data = [self.ahead.pop((layer, c)).result() for c in cids]
            self.n["disk_reads"] += len(data)
            held = self.slot_cid[layer]
            recent = held[(held >= 0) & (self.slot_used[layer] >= self.step - 1)]  # keep last step's picks
            room = self.slots - recent.size
            if room <= 0:
                continue
            arr = np.asarray(cids[:room], dtype=np.int64)
            self._install(layer, arr, data[:room], protect=recent, ahead=True)
            self.n["ahead_installed"] += int(arr.size)

    def missing(self, picked: np.ndarray, layer_of: np.ndarray) -> bool:
        """Whether any pick on disk (cids with their layers) is not in a host slot: a replayed step that read it
        attended without it and must be redone."""
        return any(not self.cached(layer, picked[layer_of == layer]).all() for layer in np.unique(layer_of))

    def end_step(self, picked: np.ndarray, layer_of: np.ndarray) -> None:
        """Book a finished step's picks on disk (cids with their layers, one entry per head and pick): LRU times,
        reads ahead that were used, and reads ahead of their neighbours. Does not block."""
        for layer in np.unique(layer_of):
            cids = picked[layer_of == layer]
            used = np.isin(self.slot_cid[layer], cids)
            self.n["ahead_used"] += int((used & self.slot_ahead[layer]).sum())
            self.slot_ahead[layer] &= ~used
            self.slot_used[layer, used] = self.step
            self._read_ahead(int(layer), np.unique(cids))
        self.n["picks"] += int(picked.size)

    def _read_ahead(self, layer: int, cids: np.ndarray) -> None:
        """Issue reads of the on-disk neighbours of cids that are neither cached nor in flight. Does not block."""
        near = np.unique((cids[:, None] + np.arange(-READ_AHEAD, READ_AHEAD + 1)[None, :]).ravel())
        near = near[(near >= self.lo) & (near < self.hi)]
        near = near[~self.cached(layer, near)]
        for c in near.tolist():
            if len(self.ahead) >= MAX_AHEAD:
                return
            if (layer, c) not in self.ahead:
                self.ahead[(layer, c)] = self.ahead_pool.submit(self._row_bytes, layer, c)
                self.n["ahead_issued"] += 1

    def stats(self) -> dict:
        n = self.n
        return {"chunks": (self.hi - self.lo) * self.layers, "chunk_range": [self.lo, self.hi],
                "host_slots_per_layer": self.slots, "disk_bytes": self.store.nbytes,
                "disk": format_size(self.store.nbytes), "backend": self.store.backend_name,
                "picks": n["picks"], "missed": n["missed"],
                "host_hit_rate": 1 - n["missed"] / n["picks"] if n["picks"] else None,
                "disk_reads": n["disk_reads"], "disk_read_bytes": n["disk_reads"] * 2 * self.row_bytes,
                "miss_wait_s": round(n["read_s"], 4), "read_ahead": {k[6:]: n[k] for k in n if k.startswith("ahead")},
                "steps_redone": n["steps_redone"]}

    def close(self) -> None:
        for f in self.ahead.values():
            f.cancel()
        self.pool.shutdown(wait=True)
        self.ahead_pool.shutdown(wait=True)
        self.ahead = {}
        self.store.close()
