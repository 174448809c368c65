"""Issue 17 probe: does adding the unpicked chunks back as one summary entry each close the gap to full attention?

A sparse step attends sinks, window and picked chunks exactly and drops the rest. This probe adds, per query head,
every unpicked candidate chunk as one entry: its log-sum-exp of the low-rank index scores (the per-chunk mass that
selection already computes, kernels/chunk_topk.chunk_scores_torch) with the chunk's mean value, merged with the
exact part by log-sum-exp. It runs bench/long_fidelity.py with the sparse cache's step wrapped (not a shipped
path: the mean values are taken from the host pool each step, so it is for the CPU and for measuring only).
Session 18 (CPU, Gemma 3 270M, 32,512 tokens, 2,048-token budget): 87.9% -> 89.1% top-1 agreement at rank 96,
score rank 48, chunk 32; 94.9% -> 95.3% at the model's defaults; bench/results/tail-estimate-gemma3-270m-32512-cpu-2026-12-07.json.
  python bench/tail_estimate_probe.py --device cpu --contexts 32512 --budgets 2048 --methods sparse \
      --variants "chunk_size=32;chunk_size=16" --out ...   (any bench/long_fidelity.py arguments)
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import torch

import tierkv.kv.caches.sparse as sparse_mod
from tierkv.kernels.chunk_topk import chunk_scores_torch

_step: dict = {}  # the cache, layer, picks and query of the step in flight (set where the picks are made)
_rank_chunks = sparse_mod.SparseKVCache.rank_chunks
_attention = sparse_mod.shadow_paged_attention


def rank_chunks(self, layer: int, q: torch.Tensor):
    top, score = _rank_chunks(self, layer, q)
    _step.update(cache=self, layer=layer, top=top, q=q[0])
    return top, score


def with_tail(*args, **kw):
    """The exact part (out, lse) as the kernel gives it, merged with the unpicked chunks' summary entries."""
    out, lse = _attention(*args, **kw)
    cache, layer, top, q = _step["cache"], _step["layer"], _step["top"], _step["q"]
    total, _, window_start, picks, *_ = cache.step_plan
    c, n, hkv = cache.chunk, cache.n_chunks, cache.hkv
    hq, d = out.shape
    ix = cache.index[layer]
    red = chunk_scores_torch(ix.project_query(q), ix.coeffs, total, c, 1.0 / math.sqrt(d), "mass",
                             row_scale=ix.row_scale)  # (Hkv, G, n): each chunk's log-sum-exp, per query head
    ids = torch.arange(n, device=out.device)
    candidate = (ids >= cache.sink_chunks) & (ids < window_start)  # (n,)
    picked = torch.zeros((hkv, n), dtype=torch.bool, device=out.device)
    picked.scatter_(1, top[:, :int(picks)], True)
    red = red.masked_fill(~(candidate[None] & ~picked)[:, None, :], float("-inf"))
    rows = cache.v_host[layer][:n].float()  # (n, C, Hkv, D): pool row = chunk id without a disk tier
    v_mean = rows.mean(1)  # (n, Hkv, D)
    tail_lse = torch.logsumexp(red, -1).reshape(hq)
    tail_out = torch.einsum("hgn,nhd->hgd", torch.softmax(red, -1).nan_to_num(), v_mean).reshape(hq, d)
    m = torch.maximum(lse, tail_lse)
    a, b = torch.exp(lse - m), torch.exp(tail_lse - m).nan_to_num()
    return ((out.float() * a[:, None] + tail_out * b[:, None]) / (a + b)[:, None]).to(out.dtype), lse


if __name__ == "__main__":
    sparse_mod.SparseKVCache.rank_chunks = rank_chunks
    sparse_mod.shadow_paged_attention = with_tail
    # sys.argv stays this script's, so the record's command line names the probe
    runpy.run_path(str(Path(__file__).resolve().parent / "long_fidelity.py"), run_name="__main__")
