"""Decode-step profile by stage: CUDA kernel time from torch.profiler, grouped by kernel name.

The stages are the ones a missed speed target is explained by: weight GEMVs, chunk scoring, top-k, gather +
attention, the small fused kernels (norm, RoPE, SiLU), and the rest.
"""

from __future__ import annotations

from collections import defaultdict

# first match wins; names are matched lower-case as substrings of the kernel name
STAGES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("scoring", ("_chunk_scores",)),
    ("top-k", ("topk", "sort", "logsumexp", "reduce_kernel")),
    ("gather+attention", ("_shadow_split", "_split_kernel", "merge", "_fill_kernel")),
    ("chunk cache", ("_assign_kernel",)),
    ("weight GEMVs", ("gemv", "gemm", "nvjet", "cutlass", "xmma", "sm90")),
    ("norm/rope/silu", ("rms", "norm", "rope", "silu")),
)


def stage_of(kernel: str) -> str:
    name = kernel.lower()
    return next((s for s, keys in STAGES if any(k in name for k in keys)), "other")


def stage_times(events, steps: int) -> dict[str, float]:
    """ms per step by stage from `profiler.key_averages()` (self device time), plus 'kernel total'."""
    by: dict[str, float] = defaultdict(float)
    for e in events:
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = getattr(e, "self_cuda_time_total", 0)
        if us:
            by[stage_of(e.key)] += us / 1000 / max(1, steps)
    by["kernel total"] = sum(by.values())
    return {k: round(v, 3) for k, v in by.items()}
