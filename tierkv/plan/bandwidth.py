"""The bandwidths the planner predicts with: from the cached `tierkv bench io` probe where one exists, else the
defaults measured on the H100 machine (shared/DESIGN.md 'Ceilings'), each value naming its source.

`tierkv bench io` saves its results to `probe_path()`; `tierkv plan` reads them back.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from tierkv.errors import ConfigError
from tierkv.paths import cache_dir

GB = 1e9
# Defaults: H100 80GB HBM3 with a PCIe Gen5 x16 host link (DESIGN.md 'Ceilings'): decode GEMV weight stream
# 2.5 TB/s, pinned host->device 52 GB/s, the virtual disk 1 GB/s sequential. The CPU rate is an assumption, not a
# measurement: a multi-threaded bf16 matrix-vector product over host DRAM on a server, 20 GB/s.
DEFAULT_GBPS = {"hbm": 2500.0, "link": 52.0, "cpu": 20.0, "disk": 1.0}
# GEMV rate by GPU name where it differs from the default: the H200's HBM is 4.8 TB/s; decode GEMVs reach about
# 5/6 of the copy rate on the H100 (2.5 of 3.0 TB/s), hence 4.0.
HBM_GBPS_BY_GPU = {"H200": 4000.0, "H100": 2500.0}


@dataclass(frozen=True)
class Bandwidths:
    """Bytes/s of each path a decode token's bytes take, and where each number came from."""

    hbm: float  # GPU reads of resident weights and KV (decode GEMV rate)
    link: float  # pinned host -> device copies of 16 MiB or more
    cpu: float  # host DRAM read by matrix-vector products computed on the CPU
    disk: float  # sequential reads from the disk holding streamed weights
    source: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("hbm", "link", "cpu", "disk"):
            v = getattr(self, name)
            if not v > 0:
                raise ConfigError(f"bandwidth {name}={v!r} must be positive; give GB/s above 0")

    def overridden(self, **gbps: float | None) -> "Bandwidths":
        """A copy with the given GB/s values (None keeps the current one), each marked as given."""
        given = {k: v * GB for k, v in gbps.items() if v is not None}
        src = {**self.source, **{k: "given" for k in given}}
        return replace(self, **given, source=src)

    def to_json(self) -> dict:
        return {"gbps": {k: getattr(self, k) / GB for k in ("hbm", "link", "cpu", "disk")}, "source": dict(self.source)}


def default_bandwidths(gpu_name: str | None = None) -> Bandwidths:
    """The documented defaults; a known GPU name picks its GEMV rate."""
    hbm, hbm_src = DEFAULT_GBPS["hbm"], "default (H100 measured)"
    for key, gbps in HBM_GBPS_BY_GPU.items():
        if gpu_name and key in gpu_name:
            hbm, hbm_src = gbps, f"default for {key}"
    src = {"hbm": hbm_src, "link": "default (H100 measured)", "cpu": "default (assumed)",
           "disk": "default (H100 machine measured)"}
    return Bandwidths(hbm * GB, DEFAULT_GBPS["link"] * GB, DEFAULT_GBPS["cpu"] * GB, DEFAULT_GBPS["disk"] * GB, src)


def probe_path() -> Path:
    """Where `tierkv bench io` leaves its latest results for the planner."""
    return cache_dir("probe", "io.json")


def save_io_probe(doc: dict) -> Path:
    """Write a `tierkv bench io` document to probe_path() atomically (temp file + rename). Returns the path."""
    path = probe_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return path


def largest_size_rates(doc: dict) -> dict[str, float]:
    """Bytes/s per result name, at the largest measured size, best backend (median over repeats)."""
    best: dict[str, tuple[int, float]] = {}
    for r in doc["results"]:
        key = (int(r["size"]), float(r["gbps"]["median"]) * GB)
        if r["name"] not in best or key > best[r["name"]]:
            best[r["name"]] = key
    return {name: v[1] for name, v in best.items()}


def bandwidths_from_probe(doc: dict, where: str, gpu_name: str | None = None) -> Bandwidths:
    """Defaults overwritten by what an io document measured: link from host_to_device_pinned, disk from
    disk_to_host, cpu from cpu_gemv (bf16 matrix-vector products on all CPU threads: what a CPU-computed layer
    does), else host_to_host (a one-thread memcpy, in probes made before cpu_gemv existed). The io probe has no
    GPU GEMV rate; hbm stays the default."""
    try:
        rates = largest_size_rates(doc)
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where} is not a `tierkv bench io` result ({e}); rerun `tierkv bench io`") from None
    base = default_bandwidths(gpu_name)
    picked = {"link": rates.get("host_to_device_pinned"), "disk": rates.get("disk_to_host"),
              "cpu": rates.get("cpu_gemv") or rates.get("host_to_host")}
    got = {k: v for k, v in picked.items() if v}
    label = f"probe {where} ({doc.get('device') or 'unknown device'})"
    return replace(base, **got, source={**base.source, **{k: label for k in got}})


def load_bandwidths(io_json: str | None = None, gpu_name: str | None = None) -> Bandwidths:
    """Bandwidths from `io_json` (a `bench io --json` file) if given, else the cached probe, else the defaults."""
    path = Path(io_json) if io_json else probe_path()
    if not path.is_file():
        if io_json:
            raise ConfigError(f"--io-json {io_json!r} does not exist; give a `tierkv bench io --json` file")
        return default_bandwidths(gpu_name)
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} cannot be read as JSON ({e}); rerun `tierkv bench io`") from None
    return bandwidths_from_probe(doc, str(path), gpu_name)
