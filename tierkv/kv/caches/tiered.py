"""TieredKVCache: the KV cache spread over device slots, host memory and disk, with exact attention.

Sealed chunks are placed by the TierManager and streamed back in batches through the Prefetcher; an online
softmax (log-sum-exp) merge over the batches gives exact attention without the whole cache on the device.
Sparse mode later calls `attend_chunks` with the chunks it picked instead of all of them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import psutil
import torch

from tierkv.config import TierConfig, format_size
from tierkv.errors import BudgetError, StorageError
from tierkv.io.prefetch import Prefetcher, Sources, Ticket
from tierkv.io.staging import StagingRing
from tierkv.kv.caches.base import KVCache
from tierkv.kv.storage.layout import ChunkId, ChunkLayout
from tierkv.kv.placement.manager import DEVICE, DISK, HOST, TIERS, EvictionPolicy, Move, TierBudgets, TierManager
from tierkv.kernels.online_softmax import OnlineSoftmax
from tierkv.kv.storage.device import DevicePool
from tierkv.kv.storage.disk import DiskStore
from tierkv.kv.storage.host import HostPool, probe_mapped_read


@dataclass(frozen=True)
class TieredOptions:
    """Tuning knobs of the tiered cache that are not user budgets (TierConfig holds those)."""

    batch_tokens: int = 4096  # tokens per streamed batch (two batch buffers live on the device)
    host_read: str = "auto"  # CUDA: 'mapped' (GPU reads pinned host memory in place) | 'copy' | 'auto'
    disk_backend: str = "auto"  # 'auto' | 'kvikio' | 'posix'
    io_threads: int | None = None  # disk read threads and kvikio's; None: measured on the disk at the first spill
    staging_buffers: int = 4
    keep_files: bool = False  # keep the run directory on close (sessions)
    pin_host: bool | None = None  # None: pin when CUDA is available
    auto_host_fraction: float = 0.5  # cpu_budget=None: this share of the memory available at start


@dataclass
class _Batch:
    """Chunks fetched together: ids in index order, rows in `order` (device, host, disk), slot indices."""

    ids: list[ChunkId]
    order: list[ChunkId]
    dev: torch.Tensor
    host: torch.Tensor
    disk: list[ChunkId]
    counts: dict[str, int]


def _index(slots: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(slots, dtype=torch.long).to(device)


class TieredKVCache(KVCache):
    """KV cache over device, host and disk tiers under byte budgets; attention is exact ('full')."""

    kind = "tiered"

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, *, device: torch.device | str,
                 dtype: torch.dtype, config: TierConfig, options: TieredOptions | None = None,
                 policy: EvictionPolicy | None = None) -> None:
        self.device, self.dtype, self.config = torch.device(device), dtype, config
        self.opts = opts = options or TieredOptions()
        self.layout = lay = ChunkLayout(num_layers, num_kv_heads, head_dim, config.chunk_size, dtype)
        self.num_layers, self.seq_len, cb = num_layers, 0, lay.chunk_bytes
        dev_slots, self.batch_chunks = self._device_plan(lay, config, opts)
        host_slots = self._host_slots(cb, config, opts)
        self.manager = TierManager(lay, TierBudgets(dev_slots, host_slots), sink_tokens=config.sink_tokens,
                                   window_tokens=config.window_tokens, policy=policy)
        self.dev_pool = DevicePool(cb, dev_slots, self.device)
        self.host_pool = HostPool(cb, host_slots, pin=opts.pin_host)
        self.disk: DiskStore | None = None  # created on the first spill, so runs that fit make no files
        self._open = torch.zeros((num_layers, *lay.shape), dtype=dtype, device=self.device)  # (L, 2, C, Hkv, D)
        self._open_raw = self._open.view(num_layers, -1).view(torch.uint8)  # (L, chunk_bytes)
        self._work = [torch.empty((self.batch_chunks, cb), dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._turn = 0
        self.host_read = self._host_read_mode(opts.host_read)
        staging = StagingRing(opts.staging_buffers, self.batch_chunks * cb, pin=self.host_pool.pinned)
        self.prefetcher = Prefetcher(self.device, cb, staging, host_read=self.host_read, threads=opts.io_threads or 4)
        self._pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ahead: tuple[int, list[ChunkId], Ticket] | None = None  # (layer, chunks, ticket) prefetched
        self._epoch = 0  # bumped on every executed move
        self._plans: dict[int, tuple[tuple[int, int], list[_Batch]]] = {}  # layer -> ((epoch, sealed), batches)
        self._bounce = torch.empty(cb, dtype=torch.uint8)
        self._moved = {f"{a}->{b}": 0 for a in TIERS for b in TIERS if a != b}
        self._t = {"io_wait_s": 0.0, "attend_s": 0.0, "move_s": 0.0}
        self._steps, self._last_snap = 0, None
        self._prev_snap = self._snapshot()
        self._closed = False

    # ---- construction helpers ----------------------------------------------------------------------
    @staticmethod
    def _device_plan(lay: ChunkLayout, cfg: TierConfig, opts: TieredOptions) -> tuple[int | None, int]:
        """(device pool slots or None, chunks per streamed batch) from the KV GPU budget."""
        cb, batch = lay.chunk_bytes, max(1, opts.batch_tokens // lay.chunk_size)
        if cfg.kv_gpu_budget is None:
            return None, batch
        pinned = lay.num_layers * (lay.sink_chunks(cfg.sink_tokens) + lay.window_chunks(cfg.window_tokens))
        fixed = (lay.num_layers + pinned) * cb  # open chunks and pinned chunks
        spare = cfg.kv_gpu_budget - fixed - 2 * cb
        if spare < 0:
            raise BudgetError(
                f"kv_gpu_budget={format_size(cfg.kv_gpu_budget)} cannot hold the open chunks, sinks and window "
                f"({format_size(fixed + 2 * cb)} needed); raise kv_gpu_budget or lower sink_tokens/window_tokens")
        batch = min(batch, max(1, spare // (4 * cb)))  # at most a quarter of what is left goes to batch buffers
        return (cfg.kv_gpu_budget - lay.num_layers * cb - 2 * batch * cb) // cb, batch

    @staticmethod
    def _host_slots(cb: int, cfg: TierConfig, opts: TieredOptions) -> int:
        if cfg.cpu_budget is not None:
            return cfg.cpu_budget // cb
        return int(psutil.virtual_memory().available * opts.auto_host_fraction) // cb

    def _host_read_mode(self, asked: str) -> str:
        if self.device.type != "cuda":
            return "direct"
        if asked == "auto":
            return "mapped" if self.host_pool.pinned and probe_mapped_read(self.device) else "copy"
        return asked

    def _tier(self, name: str):
        if name == DEVICE:
            return self.dev_pool
        if name == HOST:
            return self.host_pool
        if self.disk is None:
            o = self.opts
            self.disk = DiskStore(self.layout.chunk_bytes, self.config.disk_dir, backend=o.disk_backend,
                                  threads=o.io_threads, keep=o.keep_files)
            self.prefetcher.set_threads(self.disk.threads)
        return self.disk

    # ---- writing ------------------------------------------------------------------------------------
    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, k_pre: torch.Tensor | None = None) -> None:
        """Write k, v (T, Hkv, D) into the layer's open chunk, sealing and placing full chunks. Mutates; may block
        on tier moves. k_pre is not kept yet (low-rank shadows come with sparse mode)."""
        self._pending[layer] = (k, v)
        self._write(layer, self.seq_len, k, v)

    def _write(self, layer: int, pos: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v (T, Hkv, D) at positions [pos, pos+T) of layer's open chunk, sealing full chunks. Mutates."""
        c, i, t = self.layout.chunk_size, 0, k.shape[0]
        while i < t:
            idx, off = divmod(pos, c)
            n = min(c - off, t - i)
            self._open[layer, 0, off:off + n] = k[i:i + n]
            self._open[layer, 1, off:off + n] = v[i:i + n]
            pos, i = pos + n, i + n
            if off + n == c:
                self._execute(self.manager.add(ChunkId(layer, idx)))

    def _execute(self, moves: Sequence[Move]) -> None:
        """Carry out the manager's moves in order (synchronously, after in-flight reads of slots finish).

        A tier that fails (a full or broken disk: StorageError) undoes the moves already done and the manager's
        record of them, so every chunk stays readable where it was and the error reaches the caller in one line.
        """
        if not moves:
            return
        self._epoch += 1  # cached batch plans name slots that may change now
        t0 = time.perf_counter()
        self.prefetcher.fence()
        done = 0
        try:
            for m in moves:
                self._apply(m)
                done += 1
        except StorageError:
            self._undo(moves[:done])
            self.manager.undo(moves)  # it recorded all of them when it ordered them
            raise
        finally:
            self._t["move_s"] += time.perf_counter() - t0

    def _apply(self, m: Move) -> None:
        if m.dst is None:
            self._tier(m.src).evict(m.chunk)
            return
        self._tier(m.dst).put(m.chunk, self._bytes_of(m.chunk, m.src))
        if m.src is not None:
            self._tier(m.src).evict(m.chunk)
        if (m.src or DEVICE) != m.dst:
            self._moved[f"{m.src or DEVICE}->{m.dst}"] += self.layout.chunk_bytes

    def _undo(self, moves: Sequence[Move]) -> None:
        """Put the bytes of completed moves back where they came from, newest first (a chunk new from the open
        buffer is only forgotten: the open buffer still holds it). Drops are never undone (they come last)."""
        for m in reversed(moves):
            if m.dst is None:
                continue
            if m.src is not None:
                self._tier(m.src).put(m.chunk, self._bytes_of(m.chunk, m.dst))
            self._tier(m.dst).evict(m.chunk)

    def _bytes_of(self, chunk: ChunkId, tier: str | None) -> torch.Tensor:
        """The chunk's bytes as a tensor valid until the next move (a view where possible)."""
        if tier is None:
            return self._open_raw[chunk.layer]
        if tier == DISK:
            self.disk.read_into(chunk, self._bounce)
            return self._bounce
        return self._tier(tier).view(chunk)

    # ---- attention -----------------------------------------------------------------------------------
    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Exact causal attention of q (T, Hq, D) over every stored token of layer -> (T, Hq, D).

        Reads every chunk every step, so it counts hits per tier but leaves recency alone (it would carry no
        information); the batches and their slot indices are cached until chunks move.
        """
        batches = self._full_plan(layer)
        for b in batches:
            self.manager.record_hits(b.counts)
        return self._attend_batches(layer, q, batches, include_open=True)

    def attend_chunks(self, layer: int, q: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """Attention of q over the chunks `indices` (older tokens) plus the tokens just appended (causal).

        Streams sealed chunks from their tiers in batches; the open chunk is read in place. Blocks on I/O that
        is not ready; records hits and may prefetch the next layer's first batch.
        """
        sealed = self.manager.sealed(layer)
        stream = [ChunkId(layer, i) for i in indices if i < sealed]
        if stream:
            self.manager.access(stream)
        b = self.batch_chunks
        batches = [self._batch(stream[i:i + b]) for i in range(0, len(stream), b)]
        return self._attend_batches(layer, q, batches, include_open=sealed in indices)

    def _attend_batches(self, layer: int, q: torch.Tensor, batches: list[_Batch], include_open: bool) -> torch.Tensor:
        t0, io0 = time.perf_counter(), self.prefetcher.io_wait_s
        start, c = self.seq_len, self.layout.chunk_size
        sealed = self.manager.sealed(layer)
        state = OnlineSoftmax(q, self.layout.num_kv_heads)
        if batches:
            cur = self._take_ahead(layer, batches[0])
            for i in range(len(batches)):
                nxt = self._prepare_batch(batches[i + 1]) if i + 1 < len(batches) else None
                order, ticket = cur
                if nxt is None:
                    self._prefetch_after(layer, start + q.shape[0])
                self._fold(state, self.prefetcher.complete(ticket), order, start)
                cur = nxt
        if sealed * c < start and include_open:  # old tokens of the open chunk, read in place
            m = start - sealed * c
            state.add_span(self._open[layer, 0, :m], self._open[layer, 1, :m])
        k_new, v_new = self._pending.pop(layer)
        state.add_span(k_new, v_new, causal=q.shape[0] > 1)
        out = state.result()
        io = self.prefetcher.io_wait_s - io0
        self._t["io_wait_s"] += io
        self._t["attend_s"] += time.perf_counter() - t0
        return out

    def _full_plan(self, layer: int) -> list[_Batch]:
        """The sealed chunks holding committed tokens of layer, in batches; cached until a chunk moves (epoch) or
        seals. Chunks sealed by the slice being appended are left out: their tokens come from `_pending`."""
        sealed = min(self.manager.sealed(layer), self.layout.chunks_covering(self.seq_len))
        cached = self._plans.get(layer)
        if cached is not None and cached[0] == (self._epoch, sealed):
            return cached[1]
        b = self.batch_chunks
        batches = [self._batch([ChunkId(layer, i) for i in range(lo, min(lo + b, sealed))]) for lo in range(0, sealed, b)]
        self._plans[layer] = ((self._epoch, sealed), batches)
        return batches

    def _batch(self, chunks: list[ChunkId]) -> _Batch:
        """Group chunks by tier, with their slot indices as tensors where the copy kernels want them."""
        by = {DEVICE: [], HOST: [], DISK: []}
        for ch in chunks:
            by[self.manager.tier_of(ch)].append(ch)
        host_on = self.device if self.host_read == "mapped" else torch.device("cpu")
        return _Batch(ids=list(chunks), order=by[DEVICE] + by[HOST] + by[DISK],
                      dev=_index(self.dev_pool.slots_of(by[DEVICE]), self.device),
                      host=_index(self.host_pool.slots_of(by[HOST]), host_on), disk=by[DISK],
                      counts={t: len(v) for t, v in by.items()})

    def _fold(self, state: OnlineSoftmax, rows: torch.Tensor, order: list[ChunkId], start: int) -> None:
        """Add a fetched batch (rows: (n, chunk_bytes) uint8) to the softmax state, masking tokens >= start."""
        lay = self.layout
        x = rows.view(self.dtype).view(len(order), *lay.shape)  # (n, 2, C, Hkv, D)
        k = x[:, 0].reshape(-1, lay.num_kv_heads, lay.head_dim)  # (n*C, Hkv, D)
        v = x[:, 1].reshape(-1, lay.num_kv_heads, lay.head_dim)
        if any((ch.index + 1) * lay.chunk_size > start for ch in order):  # a sealed chunk holding new tokens
            pos = torch.tensor([ch.index * lay.chunk_size for ch in order], device=rows.device)
            pos = (pos[:, None] + torch.arange(lay.chunk_size, device=rows.device)).reshape(-1)
            keep = pos < start  # those come from `_pending`; dropping them is one host sync, rare
            k, v = k[keep], v[keep]
        state.add_span(k, v)

    def _prepare(self, chunks: list[ChunkId]) -> tuple[list[ChunkId], Ticket]:
        """Start fetching chunks into the next batch buffer; rows come back as device, host, disk order."""
        return self._prepare_batch(self._batch(chunks))

    def _prepare_batch(self, batch: _Batch) -> tuple[list[ChunkId], Ticket]:
        dest = self._work[self._turn]
        self._turn ^= 1
        src = Sources(device=self.dev_pool.storage, host=self.host_pool.storage,
                      host_mapped=self.host_pool.mapped_view(self.device) if self.host_read == "mapped" else None,
                      read_disk=self.disk.read_into if self.disk is not None else None)
        ticket = self.prefetcher.prepare(dest, batch.dev, batch.host, batch.disk, src)
        return batch.order, ticket

    def _take_ahead(self, layer: int, first: _Batch) -> tuple[list[ChunkId], Ticket]:
        """The prefetched first batch if it is this one, else a fresh fetch (a stale one is completed and dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            a_layer, a_chunks, a_ticket = ahead
            if a_layer == layer and len(a_chunks) == len(first.ids) and sorted(a_chunks) == first.ids:
                return a_chunks, a_ticket  # rows were read before any later move (moves fence reads first)
            self.prefetcher.complete(a_ticket)
        return self._prepare_batch(first)

    def _prefetch_after(self, layer: int, next_start: int) -> None:
        """Start the first batch of the next layer (or of layer 0 for the next step) while this layer computes."""
        nxt = layer + 1
        end = self.seq_len if nxt < self.num_layers else next_start
        nxt %= self.num_layers
        n = min(self.manager.sealed(nxt), self.layout.chunks_covering(end), self.batch_chunks)
        if n and self._ahead is None:
            plan = self._full_plan(nxt)
            batch = plan[0] if plan and len(plan[0].ids) == n else self._batch([ChunkId(nxt, i) for i in range(n)])
            order, ticket = self._prepare_batch(batch)
            self._ahead = (nxt, order, ticket)

    # ---- session state -------------------------------------------------------------------------------
    def _chunk_kv(self, layer: int, index: int) -> torch.Tensor:
        """Chunk `index` of layer as (2, C, Hkv, D) wherever it lives (valid until the next move or disk read)."""
        chunk = ChunkId(layer, index)
        raw = self._bytes_of(chunk, self.manager.tier_of(chunk)) if index < self.manager.sealed(layer) \
            else self._open_raw[layer]
        return raw.view(self.dtype).view(self.layout.shape)

    def export_kv(self, layer: int, start: int, end: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Layer's K/V for [start, end) gathered from every tier (disk chunks verified) -> (2, T, Hkv, D)."""
        if not 0 <= start <= end <= self.seq_len:
            raise ValueError(f"range [{start}, {end}) is outside the {self.seq_len} cached positions")
        lay, c = self.layout, self.layout.chunk_size
        out = torch.empty((2, end - start, lay.num_kv_heads, lay.head_dim), dtype=self.dtype,
                          device=self.device if device is None else device)
        for idx in range(start // c, -(-end // c)):
            lo, hi = max(idx * c, start), min((idx + 1) * c, end)
            out[:, lo - start:hi - start] = self._chunk_kv(layer, idx)[:, lo - idx * c:hi - idx * c]
        return out

    def begin_import(self, num_tokens: int) -> None:
        super().begin_import(num_tokens)
        if any(self.manager.sealed(layer) for layer in range(self.num_layers)):
            raise RuntimeError("import needs an empty cache; this one has sealed chunks")

    def import_kv(self, layer: int, start: int, kv: torch.Tensor) -> None:
        """Write kv (2, T, Hkv, D) at [start, start+T) of layer; full chunks are placed by the manager (may move)."""
        kv = kv.to(self.device)
        self._write(layer, start, kv[0], kv[1])

    def truncate(self, num_tokens: int) -> None:
        """Forget positions >= num_tokens: later chunks are dropped from their tiers and the chunk holding the
        cut becomes the open chunk again. Blocks on in-flight reads. Mutates."""
        if not 0 <= num_tokens <= self.seq_len:
            raise ValueError(f"cannot truncate {self.seq_len} cached positions to {num_tokens}")
        if self._ahead is not None:
            self.prefetcher.complete(self._ahead[2])
            self._ahead = None
        self.prefetcher.fence()
        self._pending.clear()
        keep, part = divmod(num_tokens, self.layout.chunk_size)
        for layer in range(self.num_layers):
            if self.manager.sealed(layer) <= keep:
                continue  # the open chunk already holds [keep*C, num_tokens)
            if part:
                self._open[layer].copy_(self._chunk_kv(layer, keep))
            self._execute(self.manager.truncate(layer, keep))
        self.seq_len = num_tokens

    # ---- bookkeeping ---------------------------------------------------------------------------------
    def advance(self, n: int) -> None:
        """Commit n tokens; closes the step's stats."""
        super().advance(n)
        self._steps += 1
        snap = self._snapshot()
        self._last_snap = _diff(snap, self._prev_snap)
        self._prev_snap = snap

    def _snapshot(self) -> dict:
        moved = dict(self._moved)
        for pair, nbytes in self.prefetcher.bytes.items():
            moved[pair] = moved.get(pair, 0) + nbytes
        io = self._t["io_wait_s"] + self._t["move_s"]
        hits = dict(self.manager.hits)
        total = sum(hits.values())
        snap = {"bytes_moved": moved, "hits": hits,
                "hit_rate": {k: (v / total if total else 0.0) for k, v in hits.items()},
                "io_wait_s": io, "compute_s": max(0.0, self._t["attend_s"] - self._t["io_wait_s"]),
                "steps": self._steps}
        if self.host_read == "mapped":  # host-tier reads are GPU gathers the host never waits on
            snap["reads"] = "by GPU gathers from mapped pinned host memory on the copy stream"
        return snap

    def stats(self) -> dict:
        """Placement, budgets, backends, and I/O counters for the last step and in total. Does not mutate.

        Times are host wall-clock seconds: on CUDA, kernels run asynchronously, so compute_s is launch time
        plus what waiting made visible, and io_wait_s is time blocked on disk reads, copies and tier moves.
        """
        m = self.manager.stats()
        return {
            **super().stats(), "mode": self.config.attention, "chunk_bytes": self.layout.chunk_bytes, "seq_len": self.seq_len,
            "chunks": m["chunks"], "bytes": m["bytes"], "budget_bytes": m["budget_bytes"],
            "disk_backend": self.disk.backend_name if self.disk is not None else "none",
            "disk_backend_reason": self.disk.backend_reason if self.disk is not None else None,
            "disk_path": str(self.disk.path) if self.disk is not None else None,
            "disk_threads": self.disk.threads if self.disk is not None else None,
            "disk_parallelism_gbps": self.disk.parallelism.gbps if self.disk is not None and self.disk.parallelism
            else None,
            "disk_file_bytes": self.disk.file_bytes() if self.disk is not None else 0,
            "host_memory": self.host_pool.mode, "host_memory_reason": self.host_pool.pin_note or None,
            "host_read": self.host_read,
            "gpu_reserved_bytes": self.gpu_reserved_bytes, "host_reserved_bytes": self.host_reserved_bytes,
            "staging_waits": self.prefetcher.staging.waits,
            "total": self._snapshot(), "last_step": self._last_snap,
        }

    def placement_bytes(self) -> dict[str, int]:
        """Bytes of the sealed chunks in each tier (the tier manager's count)."""
        return dict(self.manager.stats()["bytes"])

    @property
    def gpu_reserved_bytes(self) -> int:
        """Device bytes this cache holds: pool slots, open chunks and batch buffers."""
        work = sum(w.numel() for w in self._work)
        return self.dev_pool.reserved_bytes + self._open_raw.numel() + work if not self._closed else 0

    @property
    def host_reserved_bytes(self) -> int:
        """Host bytes this cache holds: the host tier's slots and the staging buffers (0 once closed)."""
        return self.host_pool.reserved_bytes + self.prefetcher.staging.reserved_bytes

    def close(self) -> None:
        """Stop I/O threads, free device buffers and pinned memory, remove the run files (unless keep_files), and
        zero the placement record (stats then show nothing held). Safe to call twice."""
        if self._closed:
            return
        self._ahead = None
        self.prefetcher.close()
        if self.disk is not None:
            self.disk.close()
        self.dev_pool.close()
        self.host_pool.close()
        for layer in range(self.num_layers):
            self.manager.truncate(layer, 0)  # storage is gone already: the drop orders need no carrying out
        self._work, self._pending, self._plans = [], {}, {}
        self._open = self._open_raw = self._open.new_empty(0)
        self._closed = True


def _diff(a: dict, b: dict) -> dict:
    """a - b for the nested counters of `_snapshot` (hit rates recomputed; notes such as "reads" kept as in a)."""
    out = {k: ({kk: a[k][kk] - b[k].get(kk, 0) for kk in a[k]} if isinstance(a[k], dict)
               else a[k] - b[k] if isinstance(a[k], (int, float)) else a[k])
           for k in a if k != "hit_rate"}
    total = sum(out["hits"].values())
    out["hit_rate"] = {k: (v / total if total else 0.0) for k, v in out["hits"].items()}
    return out
