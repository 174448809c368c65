"""Streamed layer weights (issue 18 item 4): each streamed layer packed into one host block of its exact size,
copied on a side stream into a ring of static GPU slots, ahead of the layer that needs it.

Order of events for the streamed layers of one token, in plan order p = 0..k-1, slot s = p % slots:
- `fetch(layer)` makes the compute stream wait for the copy of that layer (an event, no host sync) and queues the
  copies of the next `slots - 1` streamed layers (wrapping into the next token), each after the compute stream
  released the slot it overwrites;
- `release(layer)` records, on the compute stream, that the slot may be overwritten.
Slots are static per plan position, so one token's sequence of copies and waits can be captured in a CUDA graph.
With k % slots != 0 the token boundary reuses a slot twice in a row (a short stall): choose slots dividing k.

Host blocks are pinned (exact size, tierkv/io/pinned.py) when pinning works. When it does not (locked-memory
limits), blocks stay in pageable memory and each copy goes through a ring of pinned staging buffers, with a host
copy first; `stats()["mode"]` says which. On the CPU (no CUDA) copies are plain synchronous copies.
"""

from __future__ import annotations

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
    """Streams the given layers (plan order = the order of `layers`) through `slots` device slots."""

    def __init__(self, layers: dict[int, dict[str, torch.Tensor]], device: torch.device | str, slots: int = 2) -> None:
        if not 2 <= slots <= 3 or not layers:
            raise ValueError(f"a weight streamer needs 2-3 slots and at least one layer, got {slots}, {len(layers)}")
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        self.order = list(layers)
        self.position = {layer: p for p, layer in enumerate(self.order)}
        packed = {i: pack(t, pin=cuda and pinning_available()) for i, t in layers.items()}
        self.layout = {i: p[0] for i, p in packed.items()}
        self.host = {i: p[1] for i, p in packed.items()}
        top = max(lay.nbytes for lay in self.layout.values())
        self.slots = [torch.empty(top, dtype=torch.uint8, device=self.device) for _ in range(slots)]
        pinned_all = all(p[2] for p in packed.values())
        self.mode = "cpu" if not cuda else "pinned" if pinned_all else "pageable+pinned-staging"
        self.staging = StagingRing(2, top, pin=True) if self.mode == "pageable+pinned-staging" else None
        self.copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self.ready = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.free = [torch.cuda.Event() if cuda else None for _ in range(slots)]
        self.slot_layer = [None] * slots  # which plan position each slot holds (copy queued or done)
        self._n = {"copies": 0, "bytes": 0, "fetches": 0}

    def slot_of(self, layer: int) -> int:
        return self.position[layer] % len(self.slots)

    def fetch(self, layer: int) -> dict[str, torch.Tensor]:
        """Layer `layer`'s tensors in its device slot, ready for work queued after this call on the current stream;
        queues the copies of the next streamed layers. No host sync on the pinned path."""
        p = self.position[layer]
        for ahead in range(len(self.slots)):
            self._queue((p + ahead) % len(self.order), must=ahead == 0)
        s = self.slot_of(layer)
        if self.copy_stream is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[s])
        self._n["fetches"] += 1
        return self.layout[layer].views(self.slots[s])

    def release(self, layer: int) -> None:
        """Work queued so far on the current stream is the last use of this layer's slot until its next copy."""
        s = self.slot_of(layer)
        if self.copy_stream is not None:
            self.free[s].record(torch.cuda.current_stream(self.device))
        self.slot_layer[s] = None

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
        self._copy(self.host[layer], self.slots[s][:self.layout[layer].nbytes], s)
        self._n["copies"] += 1
        self._n["bytes"] += self.layout[layer].nbytes

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, s: int) -> None:
        if self.copy_stream is None:
            dst.copy_(src)
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.free[s])
            if self.staging is None:
                dst.copy_(src, non_blocking=True)
            else:
                buf = self.staging.acquire()  # waits (host) for the copy out of it two layers ago
                buf.data[:src.numel()].copy_(src)
                dst.copy_(buf.data[:src.numel()], non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
                self.staging.release(buf, done)
            self.ready[s].record(self.copy_stream)

    def stats(self) -> dict:
        """Mode, bytes held on the host and in slots, copies and bytes streamed so far."""
        return {"mode": self.mode, "layers": len(self.order), "slots": len(self.slots),
                "host_bytes": sum(h.numel() for h in self.host.values()),
                "slot_bytes": sum(s.numel() for s in self.slots), **self._n}
