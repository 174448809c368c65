"""The decode benchmark's rows and the tierkv systems (sparse, exact offloaded) that fill them.

Every system is reported for every context: measured, or with a status saying why not (unavailable, cannot_run,
oom, skipped, error). Timing goes through `LLM.stream_ids`, whose per-token `.item()` plus an explicit sync
bounds each step.
"""

from __future__ import annotations

import gc
import importlib
import resource
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from tierkv.bench.clock import StepClock
from tierkv.config import TierConfig, format_size
from tierkv.errors import TierKVError
from tierkv.kv.caches.window_ring import rings_nbytes
from tierkv.kv.sparse.model_defaults import with_model_defaults
from tierkv.kv.storage.layout import ChunkLayout
from tierkv.models.config import ModelConfig

# tierkv-sparse decodes as users get it (on CUDA the sparse cache, its step graph-captured); tierkv-sparse-eager is the
# reference path (--no-graph: the tiered sparse cache, eager); tierkv-sparse-prefetch adds --prefetch-picks;
# tierkv-exact is full attention over the tiers (a KV GPU budget); tierkv-dense is full attention with no KV budget,
# what `attention="full"` gives by default: every K/V on the device (on CUDA the static cache, graph-captured)
TIERKV_SYSTEMS = ("tierkv-sparse", "tierkv-sparse-prefetch", "tierkv-sparse-eager", "tierkv-exact", "tierkv-dense")
HF_SYSTEMS = ("hf-default", "hf-offloaded", "hf-accelerate")
SYSTEMS = TIERKV_SYSTEMS + HF_SYSTEMS
OPT_IN_SYSTEMS = ("tierkv-sparse-prefetch", "tierkv-dense")  # dense holds the whole context's K/V on the GPU
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s not in OPT_IN_SYSTEMS)
STATUSES = ("ok", "over_budget", "oom", "cannot_run", "unavailable", "skipped", "error")


@dataclass
class DecodeSpec:
    """What `tierkv bench decode` was asked to run (sizes in bytes)."""

    model: str
    contexts: list[int]
    device: torch.device
    dtype: torch.dtype
    systems: tuple[str, ...] = DEFAULT_SYSTEMS
    gpu_budget: int | None = None
    kv_gpu_budget: int | None = None
    cpu_budget: int | None = None
    disk_dir: str | None = None
    reserve: int = 4 * 1024**3  # activations and workspace kept free of KV under the GPU budget
    steps: int = 16
    warmup: int = 4
    token_budget: int | float = TierConfig.token_budget  # sparse: the library's defaults, as a user gets them
    budget_floor_tokens: int = TierConfig.budget_floor_tokens
    # None: the library's default for the model (TierConfig's, or kv/sparse/model_defaults.py's for narrow keys)
    rank: int | None = None  # sparse: the key shadow's rank
    score_rank: int | None = None  # sparse: the chunk index's rank per KV head
    chunk_size: int | None = None
    prefill_chunk: int = 2048
    profile: bool = False
    seed: int = 0


@dataclass
class Row:
    """One (system, context) result. Numbers are None when the system did not run (see status, reason)."""

    system: str
    context: int
    status: str = "ok"
    reason: str | None = None
    decode_ms: dict | None = None  # min / median / max over the measured steps
    steps: int = 0
    prefill_tok_s: float | None = None
    peak_memory_bytes: int | None = None
    memory_kind: str = "cuda"  # 'cuda' (torch max_memory_allocated) | 'cpu-rss' (process max RSS)
    within_budget: bool | None = None
    bytes_per_token: dict | None = None  # {'host->device': bytes, ...}
    bytes_source: str | None = None  # 'tier stats' (measured) | 'modelled'
    hit_rate: dict | None = None
    io_wait_ms_per_token: float | None = None
    copy_hidden_share: float | None = None
    copy_hidden_note: str | None = None
    floor_ms: float | None = None
    plan_ms: float | None = None  # the planner's predicted ms/token (tierkv under --gpu-budget)
    weights_bound_ms: float | None = None  # max(streamed weights / measured link, GPU-read weights / measured HBM)
    # the same with the K/V that crosses the link beside the weights (sparse picks read from host memory)
    link_bound_ms: float | None = None
    weights: dict | None = None  # llm.stats["weights"]: placement, streamed bytes, GB/s, waits
    floor_parts_ms: dict | None = None
    measured_over_floor: float | None = None
    settings: dict = field(default_factory=dict)
    profile: str | None = None
    profile_stages_ms: dict | None = None  # kernel ms per step by stage (CUDA, --profile)


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    """n random token ids (prefill content does not change decode cost)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss if sys.platform == "darwin" else rss * 1024), "cpu-rss"


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        # pinned blocks a system got from torch's caching host allocator (transformers' offloaded cache) stay
        # pinned until emptied; the next system would otherwise run short of host memory
        empty_host = getattr(torch._C, "_host_emptyCache", None) or getattr(torch._C, "_accelerator_emptyHostCache", None)
        if empty_host is not None:
            empty_host()


def sparse_unavailable() -> str | None:
    """Why tierkv's sparse cache cannot run here, or None when it imports."""
    try:
        importlib.import_module("tierkv.kv.caches.eager_sparse")
    except Exception as e:  # ImportError, or an error inside the module while it is being written
        return f"tierkv.kv.caches.eager_sparse does not import ({type(e).__name__}: {str(e)[:120]})"
    return None


def kv_budget(spec: DecodeSpec, cfg: ModelConfig, weights: int, context: int,
              planned: int | None = None) -> tuple[int | None, str]:
    """(kv_gpu_budget bytes or None when the weights leave no room, how it was chosen). planned: the plan's, when
    the model was loaded under --gpu-budget (weights offload)."""
    if spec.kv_gpu_budget is not None:
        return spec.kv_gpu_budget, "given (--kv-gpu-budget)"
    if planned is not None:
        return planned, f"the plan under gpu budget {format_size(spec.gpu_budget)}"
    if spec.gpu_budget is not None:
        kv = spec.gpu_budget - weights - spec.reserve
        return (kv if kv > 0 else None), (f"gpu budget {format_size(spec.gpu_budget)} - weights {format_size(weights)}"
                                          f" - reserve {format_size(spec.reserve)}")
    full = cfg.full_attention_layers  # sliding-window layers keep rings on the device instead (kv/caches/window_split.py)
    tc = model_tier(spec, cfg)
    lay = ChunkLayout(full, cfg.num_kv_heads, cfg.head_dim, tc.chunk_size, spec.dtype)
    fixed = (full * (1 + lay.sink_chunks(tc.sink_tokens) + lay.window_chunks(tc.window_tokens)) + 6) \
        * lay.chunk_bytes
    total = lay.chunk_bytes * full * (context // tc.chunk_size + 1)
    sliding = tuple(w for w in map(cfg.binding_window, range(cfg.num_layers)) if w is not None)
    rings = rings_nbytes(sliding, cfg.num_kv_heads, cfg.head_dim, spec.dtype) if sliding else 0
    return fixed + total // 4 + rings, ("no GPU budget: sinks, window and buffers + a quarter of the context's KV"
                                        + (" + the sliding-window rings" if rings else ""))


def given_shape(spec: DecodeSpec) -> dict:
    """The sparse shape fields (rank, score_rank, chunk_size) the spec sets; the others are the model's."""
    return {k: getattr(spec, k) for k in ("rank", "score_rank", "chunk_size") if getattr(spec, k) is not None}


def model_tier(spec: DecodeSpec, cfg: ModelConfig, **fields) -> TierConfig:
    """TierConfig(**fields) with the spec's rank, score rank and chunk size where given, else the model's defaults
    (as tierkv.load gives them)."""
    fields = {**fields, **given_shape(spec)}
    return with_model_defaults(TierConfig(**fields), cfg, fields)


def tier_config(system: str, spec: DecodeSpec, kv_gpu: int | None, cfg: ModelConfig) -> TierConfig:
    """The tier settings `system` runs with on a model of shape cfg."""
    if system == "tierkv-dense":
        return model_tier(spec, cfg, prefill_chunk=spec.prefill_chunk, attention="full")
    sparse = system.startswith("tierkv-sparse")
    return model_tier(spec, cfg, kv_gpu_budget=kv_gpu, cpu_budget=spec.cpu_budget, disk_dir=spec.disk_dir,
                      prefill_chunk=spec.prefill_chunk, attention="sparse" if sparse else "full",
                      prefetch_picks=system == "tierkv-sparse-prefetch", **(sparse_settings(spec) if sparse else {}))


def sparse_settings(spec: DecodeSpec) -> dict:
    """The TierConfig fields a sparse system takes from the spec (rank: model_tier)."""
    return {"token_budget": spec.token_budget, "budget_floor_tokens": spec.budget_floor_tokens}


def budget_tokens(spec: DecodeSpec, context: int) -> int:
    """Tokens a sparse step attends at this context under the spec (TierConfig.budget_tokens)."""
    tier = TierConfig(token_budget=spec.token_budget, budget_floor_tokens=spec.budget_floor_tokens)
    return tier.budget_tokens(context)


def run_tierkv(llm, system: str, context: int, spec: DecodeSpec, weights: int) -> Row:
    """Prefill `context` random tokens and time decode steps with the system's tier settings. Never raises for
    errors a system can have (budget, OOM, missing sparse module): they become the row's status."""
    row = Row(system, context)
    sparse = system.startswith("tierkv-sparse")
    if sparse and (why := sparse_unavailable()):
        row.status, row.reason = "unavailable", why
        return row
    plan = getattr(llm, "plan", None)
    dense = system == "tierkv-dense"
    kv, how = (None, "none: every K/V on the device") if dense else \
        kv_budget(spec, llm.cfg, weights, context, None if plan is None else llm.tier.kv_gpu_budget)
    tier = model_tier(spec, llm.cfg)
    row.settings = {"kv_gpu_budget": kv, "kv_gpu_budget_from": how, "cpu_budget": spec.cpu_budget,
                    "disk_dir": spec.disk_dir, "chunk_size": tier.chunk_size}
    if sparse:
        row.settings.update(sparse_settings(spec), rank=tier.rank, score_rank=tier.score_rank,
                            budget_tokens=budget_tokens(spec, context))
    if kv is None and not dense:
        row.status, row.reason = "cannot_run", (f"weights leave no GPU room for KV ({how}); drop --kv-gpu-budget so "
                                                 f"the planner offloads weights under --gpu-budget")
        return row
    graph = llm.graph
    try:
        llm.tier = tier_config(system, spec, kv, llm.cfg)
        llm.graph = graph and system != "tierkv-sparse-eager"
        row.settings["decode"] = "graph" if llm.uses_graph else "eager"
        _measure_tierkv(llm, row, spec)
        if plan is not None:
            row.plan_ms = plan.timing.ms_per_token
            row.settings["plan"] = {"attention": plan.attention, "bound": plan.timing.bound,
                                    "counts": {p: plan.count(p) for p in ("gpu", "host", "disk", "cpu")},
                                    "staging_slots": plan.staging_slots, "gpu_bytes": dict(plan.gpu)}
        row.weights = llm.stats.get("weights")
        _measured_weight_rate(row)
    except torch.cuda.OutOfMemoryError as e:
        row.status, row.reason = "oom", str(e).splitlines()[0][:200]
    except TierKVError as e:
        row.status, row.reason = "cannot_run", str(e)
    finally:
        llm.graph = graph
        llm.close()
        free_memory(llm.device)
    return row


def _measured_weight_rate(row: Row) -> None:
    """A captured step's GB/s from the measured steps' median. The call's decode time also holds the warm-up
    steps and the graph capture, which read a row at 12 GiB as 15 GB/s while it moved 51 GB/s."""
    w = row.weights or {}
    if w.get("decode") == "graph" and w.get("streamed_bytes_per_token") and row.decode_ms:
        w["achieved_gbps"] = w["streamed_bytes_per_token"] / (row.decode_ms["median"] / 1e3) / 1e9
        w["achieved_gbps_from"] = "streamed bytes / the median measured step (a lower bound: copies overlap compute)"


def _measure_tierkv(llm, row: Row, spec: DecodeSpec) -> None:
    snaps: dict[str, Any] = {}

    def snap(name: str) -> None:
        cache = llm.newest_cache  # the cache stream_ids is decoding with
        st = cache.stats() if cache is not None else None
        snaps[name] = st.get("total") if isinstance(st, dict) else None  # a cache without totals gives no tier numbers
        for key in ("disk_tier", "prefetch", "chunk_cache"):  # the graph cache's whole-run accounts
            if isinstance(st, dict) and key in st:
                row.settings[key] = st[key]

    clock = StepClock(llm.device, spec.warmup, spec.steps, 4 if spec.profile else 0,
                      on_start=lambda: snap("start"), on_end=lambda: snap("end"))
    ids = random_ids(row.context, llm.cfg.vocab_size, spec.seed)
    llm.stop_ids = set()  # random tokens must not end the run early
    with torch.no_grad():
        for k, _ in enumerate(llm.stream_ids(ids, max_new_tokens=clock.total_steps + 1)):
            clock.tick(k)
    s = llm.stats
    row.decode_ms, row.steps, row.prefill_tok_s = clock.summary(), spec.steps, s["prefill_tok_s"]
    row.peak_memory_bytes, row.memory_kind = peak_memory(llm.device)
    row.profile, row.profile_stages_ms = clock.profile_table, clock.profile_stages
    if snaps.get("start") and snaps.get("end"):
        _tier_numbers(row, snaps["start"], snaps["end"], spec.steps)
    else:
        row.copy_hidden_note = "the cache reports no tier stats"


def _tier_numbers(row: Row, a: dict, b: dict, steps: int) -> None:
    """Per-token bytes, hit rates and host-side I/O wait between two `stats()['total']` snapshots."""
    moved_a, moved_b = a.get("bytes_moved", {}), b.get("bytes_moved", {})
    row.bytes_per_token = {k: (v - moved_a.get(k, 0)) / steps for k, v in moved_b.items()}
    row.bytes_source = "tier stats"
    hits = {k: v - a.get("hits", {}).get(k, 0) for k, v in b.get("hits", {}).items()}
    total = sum(hits.values())
    row.hit_rate = {k: v / total for k, v in hits.items()} if total else None
    if "io_wait_s" in a and "io_wait_s" in b:
        row.io_wait_ms_per_token = 1000.0 * (b["io_wait_s"] - a["io_wait_s"]) / steps
    if b.get("reads"):
        row.settings["reads"] = b["reads"]
