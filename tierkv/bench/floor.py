"""The floor of a decode row: time the bytes it must move per token would take at measured bandwidths.

Weights stream from HBM at the measured GEMV rate, KV tier traffic at the link or disk rate of its pair.
Rates are probed quickly here, or taken from a `tierkv bench io --json` file and from --hbm-gbps.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from tierkv.bench.common import now, summarize, sync
from tierkv.errors import ConfigError
from tierkv.models.config import ModelConfig


@dataclass
class Rates:
    """Bandwidths in bytes/s and where each came from."""

    hbm: float  # decode weight stream (GEMV) on the compute device
    h2d: float  # pinned host -> device (host memcpy on the CPU)
    d2h: float
    disk: float | None  # sequential cold read, None when not measured
    source: dict = field(default_factory=dict)

    def for_pair(self, pair: str) -> float | None:
        """Bandwidth for a tier-traffic key such as 'host->device' or 'kv_hbm'."""
        src, _, dst = pair.partition("->")
        if pair in ("kv_hbm", "weights_hbm") or (src == "device" and dst == "device"):
            return self.hbm
        if "disk" in (src, dst):
            return self.disk
        if dst == "device":
            return self.h2d
        return self.d2h

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items()}


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of all weights of a Llama-family model of this shape."""
    d, hd, e = cfg.hidden_size, cfg.head_dim, torch.empty((), dtype=dtype).element_size()
    qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * hd
    layer = qkv * d + (qkv if cfg.attention_bias else 0) + d * cfg.num_heads * hd + 3 * cfg.intermediate_size * d + 2 * d
    embed = cfg.vocab_size * d * (1 if cfg.tie_word_embeddings else 2)
    return e * (cfg.num_layers * layer + embed + d)


def streamed_weight_bytes(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """Weight bytes one decode token reads: everything but an untied embedding table (one row of it is read)."""
    e = torch.empty((), dtype=dtype).element_size()
    return weight_bytes(cfg, dtype) - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * e)


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V bytes one more token adds: the full-attention layers' (sliding-window layers keep a fixed window,
    `window_kv_bytes`)."""
    return 2 * cfg.full_attention_layers * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()


def window_kv_bytes(cfg: ModelConfig, dtype: torch.dtype, context: int) -> int:
    """K and V bytes the sliding-window layers hold at `context` tokens: min(window, context) each."""
    per = 2 * cfg.num_kv_heads * cfg.head_dim * torch.empty((), dtype=dtype).element_size()
    windows = (cfg.binding_window(i) for i in range(cfg.num_layers))
    return sum(min(w, context) * per for w in windows if w is not None)


def kv_bytes(cfg: ModelConfig, dtype: torch.dtype, context: int) -> int:
    """K and V bytes a cache holds at `context` tokens (what full attention reads per decode token)."""
    return kv_bytes_per_token(cfg, dtype) * context + window_kv_bytes(cfg, dtype, context)


def floor_ms(bytes_per_token: dict[str, float], rates: Rates) -> tuple[float, dict]:
    """(floor ms/token, ms per part) for a {pair: bytes} map; pairs without a known rate count as NaN."""
    parts = {}
    for pair, nbytes in bytes_per_token.items():
        if nbytes <= 0:
            continue
        bw = rates.for_pair(pair)
        parts[pair] = 1000.0 * nbytes / bw if bw else math.nan
    return sum(parts.values()), parts


def measure_rates(device: torch.device, dtype: torch.dtype, disk_dir: str | None, *, hbm_gbps: float | None = None,
                  io_json: str | None = None) -> Rates:
    """Probe the bandwidths the floor needs (a few seconds), preferring --hbm-gbps and an io JSON where given."""
    io = _from_io_json(io_json) if io_json else {}
    src = {}
    if hbm_gbps:
        hbm, src["hbm"] = hbm_gbps * 1e9, "given (--hbm-gbps)"
    else:
        hbm, src["hbm"] = _gemv_rate(device, dtype), "measured: GEMV weight stream"
    if device.type == "cuda":
        h2d = io.get("host_to_device_pinned") or _copy_rate(device, "h2d")
        d2h = io.get("device_to_host_pinned") or _copy_rate(device, "d2h")
        src["h2d"] = src["d2h"] = "io json" if io else "measured: fastest of 8 pinned copies of 256 MiB"
    else:
        h2d = d2h = io.get("host_to_host") or _copy_rate(device, "h2h")
        src["h2d"] = src["d2h"] = "measured: host memcpy (the CPU has no host link)"
    disk = io.get("disk_to_host")
    src["disk"] = "io json" if disk else "measured: 64 MiB cold sequential read"
    if not disk:
        disk = _disk_rate(disk_dir)
    return Rates(hbm, h2d, d2h, disk, src)


def _from_io_json(path: str) -> dict:
    """Median GB/s at the largest size of each io entry name (best backend) from a `bench io --json` file."""
    try:
        doc = json.load(open(path))
        out: dict[str, tuple[int, float]] = {}
        for r in doc["results"]:
            size, bw = r["size"], r["gbps"]["median"] * 1e9
            if r["name"] not in out or (size, bw) > out[r["name"]]:
                out[r["name"]] = (size, bw)
        return {k: v[1] for k, v in out.items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--io-json {path!r} is not a `tierkv bench io --json` file ({e}); rerun bench io") from None


def _gemv_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Bytes/s of y = W @ x with W large enough to leave the caches (1 GiB on CUDA, 32 MiB on the CPU)."""
    nbytes = 1024**3 if device.type == "cuda" else 32 * 1024**2
    cols = 8192
    rows = nbytes // (cols * torch.empty((), dtype=dtype).element_size())
    w = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(cols, 1, device=device).to(dtype)
    times = []
    for i in range(8):
        sync(device)
        t0 = now()
        w @ x
        sync(device)
        if i:
            times.append(now() - t0)
    return w.numel() * w.element_size() / summarize(times)["median"]


def _copy_rate(device: torch.device, kind: str) -> float:
    n = 256 * 1024**2 if device.type == "cuda" else 64 * 1024**2
    cuda = device.type == "cuda"
    host = torch.ones(n, dtype=torch.uint8, pin_memory=cuda)
    other = torch.empty(n, dtype=torch.uint8, device=device if kind != "h2h" else "cpu")
    other.fill_(0)
    times = []
    for i in range(9):
        sync(device)
        t0 = now()
        (other.copy_(host, non_blocking=True) if kind != "d2h" else host.copy_(other, non_blocking=True))
        sync(device)
        if i:
            times.append(now() - t0)
    # the fastest copy: a bound needs what the link can do, and the median of four read 38.5 GB/s on an H100 host
    # whose decode then moved 54 GB/s over the same link (bench/RESULTS.md, session 14)
    return n / summarize(times)["min"]


def _disk_rate(disk_dir: str | None) -> float:
    """One 64 MiB sequential read with the page cache dropped (posix_fadvise), in disk_dir or the cache dir."""
    from tierkv.bench.iodisk import drop_page_cache, pread_all, write_file
    from tierkv.paths import cache_dir

    folder = disk_dir or str(cache_dir("bench"))
    os.makedirs(folder, exist_ok=True)
    fd_, path = tempfile.mkstemp(prefix="tierkv-bench-rate-", dir=folder)
    os.close(fd_)
    try:
        n = 64 * 1024**2
        write_file(path, n)
        buf = np.empty(n, dtype=np.uint8)
        fd = os.open(path, os.O_RDONLY)
        try:
            drop_page_cache(fd)
            t0 = now()
            pread_all(fd, buf)
            return n / (now() - t0)
        finally:
            os.close(fd)
    finally:
        os.unlink(path)
