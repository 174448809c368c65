"""Where each decoder layer's weights live while the model runs (issue 18): resident on the compute device,
streamed from pinned host memory, streamed from disk, or computed on the CPU.

`LayerPlacer` is used while loading: it says on which device each layer's tensors load, and turns each loaded
layer into its placed form (packed host block, spill-file extents, CPU block). `finish()` gives the
`LayerStore` the forward pass asks for each layer's weights (`fetch` / `release`, around each layer, and
`begin_pass` / `end_pass` around each pass over the layers).

Only the large tensors move (the fused projections and the qkv bias); norm weights of every layer stay on the
compute device, so a layer's neighbours can read them without waiting for its copy.
A layer object here is the model's LayerWeights (any dataclass with these field names).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from tierkv.errors import ConfigError
from tierkv.io.staging import pinning_available
from tierkv.paths import cache_dir
from tierkv.weights.disk import DiskLayers, SpillFile, in_place_extents
from tierkv.weights.stream import BlockLayout, WeightStreamer, pack

WEIGHT_PLACES = ("gpu", "host", "disk", "cpu")
MOVED = ("qkv_proj", "qkv_bias", "o_proj", "gate_up_proj", "down_proj")  # fields that leave the device


def parse_placement(value, num_layers: int) -> tuple[str, ...]:
    """Per-layer places from a sequence of num_layers places, a {layer: place} dict (others stay 'gpu'), a
    comma list of num_layers places, or 'host=3,7 disk=5 cpu=9' (others 'gpu')."""
    if isinstance(value, str):
        text = value.strip()
        if "=" in text:
            value = {}
            for part in text.split():
                place, _, layers = part.partition("=")
                try:
                    value.update({int(i): place for i in layers.split(",") if i})
                except ValueError:
                    raise ConfigError(f"placement {text!r}: {part!r} is not PLACE=i,j; use e.g. 'host=3,7 disk=5'") \
                        from None
        else:
            value = [p.strip() for p in text.split(",")]
    if isinstance(value, dict):
        bad = [i for i in value if not isinstance(i, int) or not 0 <= i < num_layers]
        if bad:
            raise ConfigError(f"placement names layer {bad[0]!r}; layers are 0..{num_layers - 1}")
        value = [value.get(i, "gpu") for i in range(num_layers)]
    places = tuple(value)
    if len(places) != num_layers:
        raise ConfigError(f"placement has {len(places)} entries for {num_layers} layers; give one per layer")
    unknown = sorted({p for p in places if p not in WEIGHT_PLACES})
    if unknown:
        raise ConfigError(f"placement {unknown[0]!r} is unknown; use {', '.join(WEIGHT_PLACES)}")
    return places


def hf_sources(prefix: str, bias: bool) -> dict[str, list[str]]:
    """Hugging Face tensor names concatenated (rows) into each moved field of one layer."""
    attn, mlp = prefix + "self_attn.", prefix + "mlp."
    out = {"qkv_proj": [attn + f"{n}_proj.weight" for n in "qkv"], "o_proj": [attn + "o_proj.weight"],
           "gate_up_proj": [mlp + "gate_proj.weight", mlp + "up_proj.weight"], "down_proj": [mlp + "down_proj.weight"]}
    if bias:
        out["qkv_bias"] = [attn + f"{n}_proj.bias" for n in "qkv"]
    return out


def _moved(layer) -> dict[str, torch.Tensor]:
    return {n: getattr(layer, n) for n in MOVED if getattr(layer, n) is not None}


class LayerPlacer:
    """Places layers while they load. get_at(name, device) loads a checkpoint tensor cast to the model dtype
    (None for random weights); index: the checkpoint's safetensors_index (disk layers are read from it in place
    when its bytes match); spill_dir: where disk layers that cannot be read in place are written."""

    def __init__(self, placement: tuple[str, ...], device: torch.device, dtype: torch.dtype, *, slots: int = 2,
                 index: dict | None = None, spill_dir: str | None = None) -> None:
        self.placement, self.device, self.dtype, self.slots = placement, torch.device(device), dtype, slots
        self.index, self.spill_dir = index, spill_dir
        self.cuda = self.device.type == "cuda"
        self.packed: dict[int, tuple] = {}  # host layers: pack()'s (layout, block, pinned)
        self.cpu_blocks: dict[int, torch.Tensor] = {}
        self.disk_layout: dict[int, BlockLayout] = {}
        self.disk_extents: dict = {}
        self.spill: SpillFile | None = None
        self._in_place: dict[int, dict[str, list[str]]] = {}  # disk layers read from the checkpoint

    def device_for(self, i: int) -> torch.device:
        return self.device if self.placement[i] == "gpu" else torch.device("cpu")

    def getter(self, i: int, get_at: Callable[[str, torch.device], torch.Tensor],
               build: Callable[[Callable], object]) -> Callable[[str], torch.Tensor]:
        """The tensor getter for layer i. A disk layer whose checkpoint bytes are the block's gets meta tensors
        for its moved fields (nothing is read now); `build(get)` builds a layer from a getter (for the layout)."""
        dev = self.device_for(i)
        plain = lambda name: get_at(name, dev)  # noqa: E731
        if self.placement[i] != "disk" or self.index is None:
            return plain
        meta = self._meta_getter(plain)
        layer = build(meta)
        sources = hf_sources(f"model.layers.{i}.", getattr(layer, "qkv_bias") is not None)
        layout = BlockLayout.of(_moved(layer))
        extents = in_place_extents(layout, sources, self.index, self.dtype)
        if extents is None:
            return plain
        self._in_place[i] = sources
        self.disk_layout[i], self.disk_extents[i] = layout, extents
        return meta

    def _meta_getter(self, plain: Callable[[str], torch.Tensor]) -> Callable[[str], torch.Tensor]:
        moved = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

        def get(name: str) -> torch.Tensor:
            parts = name.split(".")
            if len(parts) >= 2 and parts[-2] in moved and name in self.index:
                return torch.empty(self.index[name].shape, dtype=self.dtype, device="meta")
            return plain(name)
        return get

    def place(self, i: int, layer):
        """The placed form of layer i (loaded on device_for(i)): what the model keeps in its layer list."""
        where = self.placement[i]
        if where == "gpu":
            return layer
        norms = {f.name: getattr(layer, f.name).to(self.device) for f in dataclasses.fields(layer)
                 if f.name not in MOVED and getattr(layer, f.name) is not None}
        moved = _moved(layer)
        if where == "host":
            self.packed[i] = pack(moved, pin=self.cuda and pinning_available())
            return dataclasses.replace(layer, **norms, **self.packed[i][0].views(self.packed[i][1]))
        if where == "cpu":  # pageable: the CPU reads it, nothing copies it
            layout, block, _ = pack(moved, pin=False)
            self.cpu_blocks[i] = block
            return dataclasses.replace(layer, **norms, **layout.views(block))
        if i not in self._in_place:  # disk, not readable in place: packed once into the spill file
            layout, block, _ = pack(moved, pin=False)
            if self.spill is None:
                self.spill = SpillFile(self.spill_dir or _default_spill_dir())
            self.disk_layout[i], self.disk_extents[i] = layout, self.spill.append(block)
        meta = {n: torch.empty(t.shape, dtype=t.dtype, device="meta") for n, t in moved.items()}
        return dataclasses.replace(layer, **norms, **meta)

    def finish(self, layers: list) -> "LayerStore":
        disk = DiskLayers(self.disk_layout, self.disk_extents, self.spill) if self.disk_layout else None
        streamer = WeightStreamer(self.packed, self.device, self.slots, disk=disk) if self.packed or disk else None
        return LayerStore(self.placement, layers, streamer, self.cpu_blocks, self.device)


def _default_spill_dir() -> str:
    return str(cache_dir("weights-spill"))


class LayerStore:
    """Each layer's weights for the forward pass, by placement (see the module text)."""

    def __init__(self, placement: tuple[str, ...], layers: list, streamer: WeightStreamer | None,
                 cpu_blocks: dict[int, torch.Tensor], device: torch.device) -> None:
        self.placement, self.layers, self.streamer, self.device = placement, layers, streamer, device
        self.cpu_blocks = cpu_blocks
        # a streamed layer's slot is fixed by its plan position, so its tensors in the slot are made once
        self._slotted = {}
        if streamer is not None:
            for i in streamer.order:
                views = streamer.layout[i].views(streamer.slots[streamer.slot_of(i)])
                self._slotted[i] = dataclasses.replace(layers[i], **views)

    @property
    def capturable(self) -> bool:
        """Whether the decode step may be captured in a CUDA graph: CPU layers and disk reads wait on the host."""
        return "cpu" not in self.placement and (self.streamer is None or self.streamer.capturable)

    def resident(self, i: int) -> bool:
        return self.placement[i] == "gpu"

    def begin_pass(self) -> None:
        if self.streamer is not None:
            self.streamer.begin_token()

    def end_pass(self) -> None:
        if self.streamer is not None:
            self.streamer.end_token()

    def fetch(self, i: int):
        if i in self._slotted:
            self.streamer.fetch(i)
            return self._slotted[i]
        return self.layers[i]

    def release(self, i: int) -> None:
        if i in self._slotted:
            self.streamer.release(i)

    def bytes_by_place(self) -> dict[str, int]:
        """Weight bytes of the layers in each place (moved fields only; norms are on the device everywhere)."""
        out = dict.fromkeys(WEIGHT_PLACES, 0)
        for i, where in enumerate(self.placement):
            out[where] += sum(t.numel() * t.element_size() for t in _moved(self.layers[i]).values())
        return out

    def device_bytes(self) -> int:
        """Device bytes of layer weights: resident layers and the staging slots."""
        slots = sum(s.numel() for s in self.streamer.slots) if self.streamer is not None else 0
        return self.bytes_by_place()["gpu"] + slots

    def reset_stats(self) -> None:
        if self.streamer is not None:
            self.streamer.reset_stats()
            if self.streamer.disk is not None:
                self.streamer.disk.reset_stats()

    def stats(self) -> dict:
        """Placement, bytes per place, and the streamer's counters since reset_stats()."""
        out = {"placement": list(self.placement), "counts": {p: self.placement.count(p) for p in WEIGHT_PLACES},
               "bytes": self.bytes_by_place(), "device_bytes": self.device_bytes(), "capturable": self.capturable}
        if self.streamer is not None:
            out["streamer"] = self.streamer.stats()
            out["streamed_bytes_per_token"] = self.streamer.bytes_per_token()
            if self.streamer.disk is not None:
                out["disk"] = self.streamer.disk.stats()
        return out

    def close(self) -> None:
        if self.streamer is not None:
            self.streamer.close()
