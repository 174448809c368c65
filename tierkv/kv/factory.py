"""The one place that chooses a KV cache: settings + model + device + use -> a cache, and why.

`choose` is the rule, pure and without tensors (tests/kv/test_factory.py checks it case by case); `build_cache`
builds what it chose and records the choice on the cache, so `stats()["path"]` names the path that ran.

The rule (README, "Cache paths"):
- attention="sparse": the sparse cache (kv/caches/sparse.py) for every use: its decode step is captured in a
  CUDA graph on CUDA with graphs on, and the same code runs eagerly elsewhere. The eager tiered sparse cache
  (kv/caches/eager_sparse.py) is a test oracle only; this rule never returns it.
- full attention with a budget or a disk_dir: the tiered cache (exact attention; moves chunks with host
  decisions, so its decode runs eagerly).
- full attention, no budgets: everything on the compute device; the static cache (graph-capturable, fixed
  capacity) on CUDA with graphs on, the growable dense cache otherwise.
A model with sliding-window layers (Gemma 3, Mistral, Qwen2 with use_sliding_window) gets, in place of a sparse or
tiered cache, kv/caches/window_split.py's: its window layers in rings on the device, only the full-attention layers in the
sparse or tiered cache (the dense and static caches apply windows themselves).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from tierkv.config import TierConfig
from tierkv.errors import ConfigError
from tierkv.kv.caches.base import KVCache
from tierkv.models.config import ModelConfig

USES = ("generate", "chat", "score")


@dataclass(frozen=True)
class CacheRequest:
    """What a caller needs a cache for. capacity: positions it must hold (a chat may grow past it later)."""

    tier: TierConfig
    model: ModelConfig
    device: torch.device
    dtype: torch.dtype
    graph: bool
    use: str
    capacity: int

    @property
    def captures(self) -> bool:
        """Whether decode may replay a captured CUDA graph: CUDA with graphs on."""
        return self.graph and self.device.type == "cuda"


@dataclass(frozen=True)
class CacheChoice:
    """The factory's decision: kind (dense, static, tiered, sparse), whether decode replays a CUDA graph, why."""

    kind: str
    captured: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def choose(req: CacheRequest) -> CacheChoice:
    """The cache kind for a request (see the module docstring). Pure."""
    if req.use not in USES:
        raise ConfigError(f"cache use {req.use!r} is unknown; use one of {', '.join(USES)}")
    tier, cap = req.tier, req.captures
    rings = ("; sliding-window layers in rings on the device, only the full-attention layers in this cache"
             if req.model.has_windows else "")
    if tier.sparse_attention:
        how = "captured in a CUDA graph" if cap else "run eagerly (no CUDA graph: CPU or graph=False)"
        return CacheChoice("sparse", cap, f"attention='sparse': the graph-capturable sparse cache, decode {how}{rings}")
    if tier.has_budgets:
        return CacheChoice("tiered", False, "full attention with kv_gpu_budget/cpu_budget/disk_dir: exact attention "
                                            f"over tiers, decode eager (chunk moves are host decisions){rings}")
    if cap:
        return CacheChoice("static", True, "full attention, no budgets, CUDA graphs on: fixed-capacity cache on the "
                                           "device, decode captured")
    return CacheChoice("dense", False, "full attention, no budgets, no CUDA graph: growable cache on the device")


def capacity_class(need: int, limit: int) -> int:
    """The capacity a fixed-capacity cache (static, sparse) is built with for `need` positions: the next power of
    quarter-octave (1024, 1280, 1536, 1792, 2048, 2560, ...), at most `limit` (the model's context + 1). Caches and captured graphs are kept per class, so
    calls and turns whose lengths fall in one class reuse them; a chat that outgrows its class moves to the next
    (its state copied by tierkv/kv/cache.copy_state) and captures once more."""
    step = 1 << max(0, max(need, 1024) - 1).bit_length() - 3  # four classes per octave: at most 25% unused
    return min(-(-max(need, 1024) // step) * step, max(limit, need))


def capacity_classes(upto: int, limit: int) -> list[int]:
    """Every capacity class from the smallest up to the one holding `upto` positions, ascending."""
    out, need = [], 1
    last = capacity_class(upto, limit)
    while not out or out[-1] < last:
        out.append(capacity_class(need, limit))
        need = out[-1] + 1
    return out


def build_cache(req: CacheRequest, rope) -> tuple[KVCache, CacheChoice]:
    """A fresh cache for req (rope: the model's RoPE tables, for the sparse shadows) and the choice it came from."""
    choice = choose(req)
    c = req.model
    capacity = capacity_class(req.capacity, c.max_position_embeddings + 1)
    where = {"device": req.device, "dtype": req.dtype}
    if choice.kind in ("sparse", "tiered") and c.has_windows:
        cache = _window_split(req, choice, rope, capacity)
    elif choice.kind in ("sparse", "tiered"):
        cache = _tiered(req, choice, rope, capacity, c.num_layers, req.tier)
    elif choice.kind == "static":
        from tierkv.kv.caches.static import StaticKVCache

        cache = StaticKVCache(c.num_layers, c.num_kv_heads, c.head_dim, **where, capacity=capacity,
                              windows=c.layer_windows)
    else:
        from tierkv.kv.caches.dense import DenseKVCache

        cache = DenseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, **where, capacity=req.capacity,
                             windows=c.layer_windows)
    cache.record_path(choice.as_dict())
    return cache, choice


def _tiered(req: CacheRequest, choice: CacheChoice, rope, capacity: int, num_layers: int, tier: TierConfig) -> KVCache:
    """The sparse or tiered cache of `choice` for num_layers layers under `tier`."""
    c = req.model
    shape = (num_layers, c.num_kv_heads, c.head_dim)
    where = {"device": req.device, "dtype": req.dtype}
    if choice.kind == "sparse":
        from tierkv.kv.caches.sparse import SparseKVCache

        return SparseKVCache(*shape, **where, config=tier, capacity=capacity, rope=rope,
                                 chunk_cache=tier.gpu_chunk_cache, prefetch=tier.prefetch_picks)
    from tierkv.kv.caches.tiered import TieredKVCache

    return TieredKVCache(*shape, **where, config=tier)


def _window_split(req: CacheRequest, choice: CacheChoice, rope, capacity: int) -> KVCache:
    """Sliding-window layers in rings on the device, the full-attention layers alone in the sparse or tiered cache
    (kv/caches/window_split.py), whose kv_gpu_budget is what the rings leave."""
    from tierkv.kv.caches.window_ring import rings_nbytes
    from tierkv.kv.caches.window_split import WindowSplitKVCache, ring_budget

    c = req.model
    windows = tuple(c.binding_window(i) for i in range(c.num_layers))  # a window as long as the context: tiers
    sliding = tuple(w for w in windows if w is not None)
    if not sliding:
        return _tiered(req, choice, rope, capacity, c.num_layers, req.tier)
    ring_bytes = rings_nbytes(sliding, c.num_kv_heads, c.head_dim, req.dtype)
    full = c.num_layers - len(sliding)
    inner = _tiered(req, choice, rope, capacity, full, ring_budget(req.tier, ring_bytes)) if full else None
    return WindowSplitKVCache(windows, inner, num_kv_heads=c.num_kv_heads, head_dim=c.head_dim, device=req.device,
                              dtype=req.dtype, capacity=capacity)
