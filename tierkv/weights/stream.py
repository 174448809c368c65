"""Streamed layer weights (issue 18 item 4): each streamed layer packed into one host block of its exact size,
copied on a side stream into a ring of static GPU slots, ahead of the layer that needs it.

Order of events for the streamed layers of one token, in plan order p = 0..k-1, slot s = p % slots:
- `fetch(layer)` makes the compute stream wait for the copy of that layer (an event, no host sync) and queues the
  copies of the next `slots - 1` streamed layers (wrapping into the next token), each after the compute stream
  released the slot it overwrites;
- `release(layer)` records, on the compute stream, that the slot may be overwritten, and queues the copy of the
  layer that slot takes next, so the last release of a token starts the next token's first copy.
Slots are static per plan position, so one token's sequence of copies and waits can be captured in a CUDA graph.

Host blocks are pinned (exact size, tierkv/io/pinned.py) when pinning works. When it does not (locked-memory
limits), blocks stay in pageable memory and each copy goes through a ring of pinned staging buffers, with a host
copy first; `stats()["mode"]` says which. On the CPU (no CUDA) copies are plain synchronous copies.

Disk-resident layers (`disk`, tierkv/weights/disk.py) take the same slots: their copy starts from a pinned staging
buffer the disk reader filled ahead, and hands the buffer back with the copy's event.

CUDA graphs. A token is bracketed by `begin_token()` / `end_token()`. Eagerly, begin_token makes the copy stream
wait for the work queued so far (a replayed graph that used the slots included). While a graph is captured, the
copies are captured with it: the copy stream joins the capture at begin_token; a wait on an event recorded before
the capture (the slots the previous token prefetched) is left out, since a replay starts only after the previous
replay, its tail copies included, finished on the same stream (an eager pass likewise ends waiting for its copies);
end_token joins the prefetch copies of the next token back, so the graph ends when they land (after lm_head, which
they overlap), and leaves the events the capture recorded to the graph, since CUDA refuses eager waits on them.
Each token's sequence of fetches, copies and releases is the same, so one captured token replays correctly for
every token. Disk reads and pageable staging wait on the host and
cannot be captured (`capturable` is False then).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from tierkv.io.pinned import pinned_empty
from tierkv.io.staging import StagingRing, pinning_available


@dataclass(frozen=True)
class BlockLayout:
    """Where each tensor of one layer sits in its block: byte offset, shape, dtype. Tensors are laid out by
    decreasing element size, so each offset is a multiple of its element size with no padding."""

    names: tuple[str, ...]
    offsets: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[torch.dtype, ...]
    nbytes: int

    @classmethod
    def of(cls, tensors: dict[str, torch.Tensor]) -> "BlockLayout":
        order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
        offsets, at = [], 0
        for name in order:
            offsets.append(at)
            at += tensors[name].numel() * tensors[name].element_size()
        return cls(tuple(order), tuple(offsets), tuple(tuple(tensors[n].shape) for n in order),
                   tuple(tensors[n].dtype for n in order), at)

    def nbytes_of(self, name: str) -> int:
        k = self.names.index(name)
        return torch.Size(self.shapes[k]).numel() * torch.empty((), dtype=self.dtypes[k]).element_size()

    def views(self, block: torch.Tensor) -> dict[str, torch.Tensor]:
        """Tensors viewing a flat uint8 block (host or device) laid out this way."""
        out = {}
        for name, off, shape, dtype in zip(self.names, self.offsets, self.shapes, self.dtypes):
            n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
            out[name] = block[off:off + n].view(dtype).view(shape)
        return out


def pack(tensors: dict[str, torch.Tensor], pin: bool) -> tuple[BlockLayout, torch.Tensor, bool]:
    """(layout, flat uint8 host block of exactly layout.nbytes, pinned?). Pinning that fails falls back to pageable."""
    layout = BlockLayout.of(tensors)
    block, pinned = None, False
    if pin:
        try:
            block, pinned = pinned_empty(layout.nbytes), True
        except RuntimeError:  # locked-memory limit or no pinnable memory: the streamer reports pageable mode
            block = None
    if block is None:
        block = torch.empty(layout.nbytes, dtype=torch.uint8)
    for name, view in layout.views(block).items():
        view.copy_(tensors[name])
    return layout, block, pinned


class WeightStreamer:
    """Streams the given layers (plan order = increasing layer index) through `slots` device slots: `layers` from
    host blocks packed here, `disk` (a DiskLayers) from files through pinned staging."""

    def __init__(self, layers: dict[int, dict[str, torch.Tensor] | tuple], device: torch.device | str, slots: int = 2,
                 disk=None) -> None:
        disk_layout = dict(disk.layout) if disk is not None else {}
        if not 2 <= slots <= 3 or not (layers or disk_layout):
            raise ValueError(f"a weight streamer needs 2-3 slots and at least one layer, got {slots}, "
                             f"{len(layers) + len(disk_layout)}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.order = sorted({*layers, *disk_layout})
        self.position = {layer: p for p, layer in enumerate(self.order)}
        # a value is a layer's tensors, or what pack() made of them already (packed while loading)
        pin = cuda and pinning_available()
        packed = {i: t if isinstance(t, tuple) else pack(t, pin=pin) for i, t in layers.items()}
        self.layout = {**{i: p[0] for i, p in packed.items()}, **disk_layout}
        self.host = {i: p[1] for i, p in packed.items()}
        self.disk = disk
        top = max(lay.nbytes for lay in self.layout.values())
        self.slots = [torch.empty(top, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        pinned_all = all(p[2] for p in packed.values())
        self.mode = "cpu" if not cuda else "pinned" if pinned_all else "pageable+pinned-staging"
        self.staging = StagingRing(2, top, pin=True) if self.mode == "pageable+pinned-staging" else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.slot_layer = [None] * slots  # which plan position each slot holds (copy queued or done)
        self.fetched = [False] * slots  # fetched and not yet released
        self._capturing = False
        self._captured = {"ready": set(), "free": set()}  # slots whose event was recorded in the running capture
        self._graph_events: list[torch.cuda.Event] = []  # events captured graphs record and wait on (kept alive)
        self._timed: list[tuple] = []  # (kind, start event, end event) on CUDA, resolved in stats()
        self._n = {"copies": 0, "bytes": 0, "fetches": 0, "disk_copies": 0, "disk_bytes": 0,
                   "copy_s": 0.0, "wait_s": 0.0}

    @property
    def capturable(self) -> bool:
        """Whether a token's copies can be captured in a CUDA graph (no host waits inside a token)."""
        return self.mode in ("pinned", "cpu") and self.disk is None

    def bytes_per_token(self) -> int:
        """Bytes copied into the slots per token in steady state: every streamed layer once."""
        return sum(lay.nbytes for lay in self.layout.values())

    def slot_of(self, layer: int) -> int:
        return self.position[layer] % len(self.slots)

    def begin_token(self) -> None:
        """Start a pass over the layers (a decode token or a prefill pass); see the module text for graphs."""
        if any(self.fetched):  # a pass ended early (an error): forget held slots; their bytes stay valid
            self._drain()
            self.fetched = [False] * len(self.slots)
            self.slot_layer = [None] * len(self.slots)
        if self.copy_stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        self._capturing = torch.cuda.is_current_stream_capturing()
        self._captured = {"ready": set(), "free": set()}
        self.copy_stream.wait_stream(current)  # eager: after replayed graphs; captured: joins the capture

    def end_token(self) -> None:
        """End a pass: the work queued after it waits for the copies queued so far (the next token's prefetch
        included). Inside a capture this joins the copy stream back into the graph; eagerly it makes the next
        pass, which may be a capture, start with the slots it expects already written."""
        if self.copy_stream is None:
            return
        current = torch.cuda.current_stream(self.device)
        if self._capturing:
            for s in self._captured["ready"]:
                current.wait_event(self.ready[s])
            self._retire_captured_events()
            self._capturing = False
        else:
            current.wait_stream(self.copy_stream)

    def fetch(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors in its device slot, ready for work queued after this call on the current stream;
        queues the copies of the next streamed layers. No host sync on the pinned path."""
        p = self.position[layer]
        for ahead in range(len(self.slots)):
            self._queue((p + ahead) % len(self.order), must=ahead == 0)
        s = self.slot_of(layer)
        if self.copy_stream is not None and (not self._capturing or s in self._captured["ready"]):
            current = torch.cuda.current_stream(self.device)
            timed = not self._capturing
            if timed:
                before = torch.cuda.Event(enable_timing=True)
                before.record(current)
            current.wait_event(self.ready[s])
            if timed:
                after = torch.cuda.Event(enable_timing=True)
                after.record(current)
                self._timed.append(("wait_s", before, after))
        self.fetched[s] = True
        self._n["fetches"] += 1
        return self.layout[layer].views(self.slots[s])

    def release(self, layer: int) -> None:
        """Work queued so far on the current stream is the last use of this layer's slot until its next copy."""
        s = self.slot_of(layer)
        if self.copy_stream is not None:
            self.free[s].record(torch.cuda.current_stream(self.device))
            if self._capturing:
                self._captured["free"].add(s)
        self.slot_layer[s] = None
        self.fetched[s] = False
        p = self.position[layer]
        for ahead in range(1, len(self.slots)):  # the freed slot takes its next layer now (next token's, at the end)
            self._queue((p + ahead) % len(self.order), must=False)

    def _queue(self, p: int, must: bool) -> None:
        """Start the copy of plan position p into its slot unless it is there or the slot is still in use."""
        s = p % len(self.slots)
        if self.slot_layer[s] == p:
            return
        if self.slot_layer[s] is not None:
            if must:
                raise RuntimeError(f"slot {s} still holds layer {self.order[self.slot_layer[s]]}; release it first")
            return
        self.slot_layer[s] = p
        layer = self.order[p]
        nbytes = self.layout[layer].nbytes
        if layer in self.host:
            self._copy(self.host[layer], self.slots[s][:nbytes], s)
        else:
            t0 = time.perf_counter()
            buf = self.disk.acquire(layer)  # waits (host) for the read the disk thread started ahead
            self._n["wait_s"] += time.perf_counter() - t0
            self._copy(buf[:nbytes], self.slots[s][:nbytes], s)
            done = None
            if self.copy_stream is not None:  # its own event: ready[s] is recorded again by the slot's next copy
                done = torch.cuda.Event()
                done.record(self.copy_stream)
            self.disk.release(layer, done)
            self._n["disk_copies"] += 1
            self._n["disk_bytes"] += nbytes
        self._n["copies"] += 1
        self._n["bytes"] += nbytes

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, s: int) -> None:
        """Queue src -> dst (slot s) on the copy stream (on the CPU: copy now)."""
        if self.copy_stream is None:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
            self._n["copy_s"] += dt
            self._n["wait_s"] += dt  # synchronous: the compute waits for all of it
            return
        with torch.cuda.stream(self.copy_stream):
            if not self._capturing or s in self._captured["free"]:
                self.copy_stream.wait_event(self.free[s])
            timed = not self._capturing
            if timed:
                start = torch.cuda.Event(enable_timing=True)
                start.record(self.copy_stream)
            if self.staging is None:
                dst.copy_(src, non_blocking=True)
            else:
                buf = self.staging.acquire()  # waits (host) for the copy out of it two layers ago
                buf.data[:src.numel()].copy_(src)
                dst.copy_(buf.data[:src.numel()], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
                self.staging.release(buf, done)
            if timed:
                end = torch.cuda.Event(enable_timing=True)
                end.record(self.copy_stream)
                self._timed.append(("copy_s", start, end))
            self.ready[s].record(self.copy_stream)
            if self._capturing:
                self._captured["ready"].add(s)

    def _retire_captured_events(self) -> None:
        """Give every slot whose event this capture recorded a fresh event. CUDA refuses an eager wait on an event
        last recorded inside a capture (invalid argument), and an eager pass after a replay needs none: begin_token
        orders the copy stream after the replayed graph. The graph keeps using the old events, kept alive here."""
        for kind in ("ready", "free"):
            events = getattr(self, kind)
            for s in self._captured[kind]:
                self._graph_events.append(events[s])
                events[s] = torch.cuda.Event()
        self._captured = {"ready": set(), "free": set()}

    def _drain(self) -> None:
        if self.copy_stream is not None:
            self.copy_stream.synchronize()

    def _resolve_timing(self) -> None:
        """Fold the CUDA timing events recorded so far into copy_s / wait_s (waits for them)."""
        for kind, start, end in self._timed:
            end.synchronize()
            self._n[kind] += start.elapsed_time(end) / 1e3
        self._timed.clear()

    def reset_stats(self) -> None:
        self._resolve_timing()
        for k in self._n:
            self._n[k] = 0.0 if k.endswith("_s") else 0

    def stats(self) -> dict:
        """Mode, bytes held on the host and in slots, copies and bytes streamed, copy and wait seconds so far."""
        self._resolve_timing()
        return {"mode": self.mode, "layers": len(self.order), "slots": len(self.slots),
                "host_bytes": sum(h.numel() for h in self.host.values()),
                "slot_bytes": sum(s.numel() for s in self.slots), **self._n}

    def close(self) -> None:
        self._drain()
        if self.disk is not None:
            self.disk.close()
