"""The KV side of a plan: where the cache's bytes live and what a decode token reads of them, per attention mode.

Full attention reads every cached token each step: GPU-resident KV at HBM speed, the rest over the link (and
the disk). Sparse attention (tierkv/kv/caches/sparse.py) keeps shadows and the score index on the GPU, all K/V in
host memory, and reads per step: the index over the whole context, shadow rows of the picks (keys are rebuilt),
the picks' values and the sinks' and window's keys and values; picks held in the GPU pool of resident values
are read from HBM. Picks are taken as spread uniformly over the context. Sliding-window layers keep their
window on the GPU in both modes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tierkv.config import format_size
from tierkv.plan.inputs import PlanInputs
from tierkv.plan.sizes import (capacity_tokens, kv_token_bytes_per_layer, layer_windows,
                               sparse_gpu_bytes_per_layer, window_kv_bytes)


# TieredOptions.batch_tokens (tierkv/kv/tiered.py): offloaded chunks stream through two GPU batches of this size
TIERED_BATCH_TOKENS = 4096


@dataclass(frozen=True)
class KVPlan:
    """Bytes of the KV cache in each tier and bytes per decode token on each path."""

    budget_tokens: int  # tokens attended per step (the context in full mode)
    gpu_pool_bytes: int  # GPU KV beyond the fixed parts (full: resident KV; sparse: resident values)
    host_bytes: int
    disk_bytes: int
    hbm_per_token: int
    link_per_token: int
    disk_per_token: int
    reasons: tuple[str, ...]


def _full_layers(inp: PlanInputs) -> int:
    return sum(w is None for w in layer_windows(inp.model, inp.layer_windows))


def _window_bytes(inp: PlanInputs) -> int:
    return window_kv_bytes(inp.model, inp.elem_bytes, layer_windows(inp.model, inp.layer_windows), inp.context)


def kv_fixed_gpu_bytes(inp: PlanInputs, mode: str) -> int:
    """GPU bytes of KV parts every plan in this mode holds: window rings, and in sparse mode the shadows, index,
    key ring and outlier flags of each full-attention layer."""
    fixed = _window_bytes(inp)
    if mode == "full":
        fixed += tiered_fixed_gpu_bytes(inp)
    if mode == "sparse":
        fixed += _full_layers(inp) * sparse_gpu_bytes_per_layer(inp.model, inp.elem_bytes, inp.context, inp.sparse)
    return fixed


def _chunks(tokens: int, chunk: int) -> int:
    return -(-tokens // chunk)


def tiered_fixed_gpu_bytes(inp: PlanInputs) -> int:
    """GPU bytes the exact tiered cache (tierkv/kv/tiered.py) holds under any kv_gpu_budget: per full-attention
    layer its open chunk and its pinned sink and window chunks, and two batches of TIERED_BATCH_TOKENS streaming
    through its work buffers."""
    sp = inp.sparse
    chunk_bytes = sp.chunk_size * kv_token_bytes_per_layer(inp.model, inp.elem_bytes)
    per_layer = 1 + _chunks(sp.sink_tokens, sp.chunk_size) + _chunks(sp.window_tokens, sp.chunk_size)
    batch = max(1, TIERED_BATCH_TOKENS // sp.chunk_size)
    return (_full_layers(inp) * per_layer + 2 * batch) * chunk_bytes


def kv_total_bytes(inp: PlanInputs) -> int:
    """K and V bytes of every full-attention layer over the context (chunk-rounded): the host pool's size."""
    cap = capacity_tokens(inp.context, inp.sparse.chunk_size)
    return cap * kv_token_bytes_per_layer(inp.model, inp.elem_bytes) * _full_layers(inp)


def _split(total: int, gpu_free: int, host_free: int) -> tuple[int, int, int]:
    """(gpu, host, disk) bytes of `total`, filling the GPU room, then the host room, then the disk."""
    gpu = max(0, min(total, gpu_free))
    host = max(0, min(total - gpu, host_free))
    return gpu, host, total - gpu - host


def full_kv_plan(inp: PlanInputs, gpu_free: int, host_free: int, disk_free: int) -> KVPlan:
    """Full attention: the KV fills the GPU room left after the weights, then host memory, then the disk."""
    total = kv_total_bytes(inp)
    gpu, host, disk = _split(total, gpu_free, host_free)
    why = (f"KV {format_size(total)}: {format_size(gpu)} on the GPU, {format_size(host)} in host memory, "
           f"{format_size(disk)} on disk; full attention reads all of it every token")
    return KVPlan(inp.context, gpu, host, disk, hbm_per_token=gpu + _window_bytes(inp), link_per_token=host + disk,
                  disk_per_token=disk, reasons=(why,))


def sparse_kv_plan(inp: PlanInputs, gpu_free: int, host_free: int, disk_free: int) -> KVPlan:
    """Sparse attention: K/V in host memory (the oldest on disk past cpu_budget), the GPU room left after the
    weights holds values of the latest tokens, and each step reads the picks."""
    cfg, e, sp = inp.model, inp.elem_bytes, inp.sparse
    n_full, cap = _full_layers(inp), capacity_tokens(inp.context, sp.chunk_size)
    value_token = cfg.num_kv_heads * cfg.head_dim * e * n_full  # one token's values over the full layers
    total = kv_total_bytes(inp)
    host = max(0, min(total, host_free))
    disk = total - host
    resident = min(cap, max(0, gpu_free) // value_token) if value_token else 0
    budget = inp.budget_tokens()
    fixed = min(sp.sink_tokens + sp.window_tokens, budget)
    picks = (budget - fixed + 2 * fixed) * value_token  # values of picks; keys and values of sinks and window
    resident_share = resident / cap
    link = int(picks * (1 - resident_share))
    disk_read = int(link * disk / total) if total else 0
    index = n_full * cap * cfg.num_kv_heads * (min(sp.score_rank, cfg.head_dim) + 4)
    shadow_rows = n_full * budget * min(sp.rank, cfg.num_kv_heads * cfg.head_dim) * e
    hbm = index + shadow_rows + int(picks * resident_share) + _window_bytes(inp)
    reasons = (f"sparse KV: {budget} tokens attended per step; shadows and index "
               f"{format_size(kv_fixed_gpu_bytes(inp, 'sparse'))} on the GPU; K/V {format_size(total)} "
               f"({format_size(host)} host, {format_size(disk)} disk)",
               f"GPU pool holds the values of the latest {resident} tokens ({format_size(resident * value_token)}), "
               f"{100 * resident_share:.0f}% of the context: picks there are read from HBM, the rest "
               f"({format_size(link)} per token) over the link")
    return KVPlan(budget, resident * value_token, host, disk, hbm_per_token=hbm, link_per_token=link,
                  disk_per_token=disk_read, reasons=reasons)
