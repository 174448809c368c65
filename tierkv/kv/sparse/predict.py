"""Prefetch of layer i+1's likely picks into the GPU chunk cache while layer i's MLP runs.

The model predicts layer i+1's query from the residual after layer i's attention (layer i+1's norm, QKV
projection and RoPE; InfiniGen's observation that the residual changes little from layer to layer) and hands
it to `PickPrefetch.issue`, which scores chunks with layer i+1's own index, picks the top ones and copies those
not in the chunk cache (nor resident) from host memory into it. Inside a CUDA graph this runs on a side stream
captured as a branch, joined before layer i+1's attention; eagerly it runs inline. The real picks of layer i+1
are still chosen from its real query, so a wrong prediction costs link bytes, never accuracy: picks it missed
are filled on the main stream as without prediction.
"""

from __future__ import annotations

import torch

from tierkv.kernels import sparse_entries
from tierkv.kernels.chunk_cache import chunk_cache_assign, chunk_cache_fill


class PickPrefetch:
    """Side stream, predicted picks per layer (L, Hkv, K) and counts for one SparseKVCache with a chunk cache.

    counts (2,): [picks of layers >= 1 that the prediction contained, such picks]; fills (3,): chunk_cache_assign's
    counts for the predicted picks [copied with exact keys, already cached, predicted]. No host sync anywhere.
    """

    def __init__(self, cache) -> None:
        self.cache = cache
        self.side = torch.cuda.Stream(cache.device) if cache.device.type == "cuda" else None
        shape = (cache.num_layers, cache.hkv, cache.max_picks)
        self.top = torch.full(shape, -1, dtype=torch.long, device=cache.device)
        self.counts = torch.zeros(2, dtype=torch.long, device=cache.device)
        self.fills = torch.zeros(3, dtype=torch.long, device=cache.device)
        self._forked = False
        self._issued = [False] * cache.num_layers  # a prediction was made for the layer in this step

    def stream(self):
        """The stream the prediction runs on: the side stream while a graph is captured, else the current one.
        The caller enters it after `fork()`."""
        return self.side if self._forked else torch.cuda.current_stream(self.cache.device)

    def fork(self, capturing: bool) -> None:
        """Start a branch: the side stream waits for the work so far (graph capture only)."""
        self._forked = capturing and self.side is not None
        if self._forked:
            self.side.wait_stream(torch.cuda.current_stream(self.cache.device))

    def join(self) -> None:
        """The current stream waits for the branch, before the predicted layer's attention reads the cache."""
        if self._forked:
            torch.cuda.current_stream(self.cache.device).wait_stream(self.side)
            self._forked = False

    def issue(self, layer: int, q: torch.Tensor) -> None:
        """Pick layer's chunks for the predicted query q (1, Hq, D) and copy the ones not cached nor resident into
        its chunk cache. Mutates the cache's chunk cache; graph-safe."""
        c = self.cache
        _, _, _, picks, fixed_ids, fixed_len = c.step_plan
        top, score = c.rank_chunks(layer, q)
        _, lengths, cids = sparse_entries(top, score, picks, c.covered_chunks, c.outlier[layer], fixed_ids,
                                          fixed_len, c.chunk, c.n_chunks)
        f = fixed_ids.shape[0]
        picked = lengths[:, f:]
        self.top[layer].copy_(torch.where(picked > 0, top, -1))
        self._issued[layer] = True
        fetch = c.off_gpu(top, picked)
        csrc = chunk_cache_assign(top, fetch, cids[:, f:], c.cached_ids[layer], self.fills)
        chunk_cache_fill(top, cids[:, f:], csrc, c.k_host[layer], c.v_host[layer], c.k_cache[layer], c.v_cache[layer])

    def score(self, layer: int, top: torch.Tensor, picked: torch.Tensor) -> None:
        """Count the layer's real picks (top (Hkv, K), picked bool) that its prediction contained. Graph-safe."""
        if not self._issued[layer]:  # layer 0, or a step without prediction (the fit)
            return
        self._issued[layer] = False
        hit = (top.unsqueeze(-1) == self.top[layer].unsqueeze(-2)).any(-1) & picked  # (Hkv, K)
        self.counts.add_(torch.stack([hit, picked]).flatten(1).sum(1))

    def stats(self, link_chunk_bytes: int) -> dict:
        right, picks = self.counts.tolist()
        exact, cached, predicted = self.fills.tolist()
        copied = predicted - cached
        return {"picks": picks, "predicted": right, "accuracy": right / picks if picks else None,
                "chunks_copied": copied, "already_cached": cached,
                "bytes": (copied + exact) * link_chunk_bytes}
