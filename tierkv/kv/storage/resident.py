"""GPU copies of the most recent chunks of the sparse graph cache's host pool: values, and keys when kept.

Picks in these chunks are read from GPU memory instead of through the host link. The copies cover the *last*
chunks because on real text picks are recent (SmolLM2, 6K tokens of pydoc text: 76% of picks in the last quarter
of the chunks, 0.7% in the first). The cache decides how many fit its budget; this class only holds them.
"""

from __future__ import annotations

import torch


class ResidentChunks:
    """Copies of host-pool chunks [start, n_chunks): v and (keys=True) k, (L, n + 1, C, Hkv, D) each.

    Row n of each is scratch: writes for positions before `start` land there, so that a graph-captured append
    needs no branch. Zeroed at creation; `copy_from` fills what the pool already holds.
    """

    def __init__(self, pool_shape: tuple[int, ...], n: int, *, keys: bool, device: torch.device,
                 dtype: torch.dtype) -> None:
        layers, n_chunks, chunk, hkv, d = pool_shape
        self.n, self.start, self.chunk = n, n_chunks - n, chunk
        shape = (layers, n + 1, chunk, hkv, d)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k = torch.zeros(shape, device=device, dtype=dtype) if keys else None

    @property
    def nbytes(self) -> int:
        return sum(0 if t is None else t.numel() * t.element_size() for t in (self.v, self.k))

    def rows(self, at: torch.Tensor) -> torch.Tensor:
        """Flat token rows for positions at: their own inside the copied chunks, else the scratch row's."""
        first = self.start * self.chunk
        return torch.where(at >= first, at - first, self.n * self.chunk + at.remainder(self.chunk))

    def flat(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(k or None, v) of one layer as (rows, Hkv, D) views, for writes at `rows(...)`."""
        v = self.v[layer].view(-1, *self.v.shape[-2:])
        return (None if self.k is None else self.k[layer].view(-1, *self.k.shape[-2:])), v

    def chunks(self, layer: int) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(k or None, v) of one layer's copied chunks, (n, C, Hkv, D): what the attention kernel reads."""
        return (None if self.k is None else self.k[layer, :self.n]), self.v[layer, :self.n]

    def copy_from(self, k_pool: torch.Tensor, v_pool: torch.Tensor, total: int) -> None:
        """Copy tokens [start * C, total) of the pools (L, N, C, Hkv, D) into the copies, all layers. Mutates."""
        first = self.start * self.chunk
        if first >= total:
            return
        for pool, res in ((v_pool, self.v), (k_pool, self.k)):
            if res is not None:
                flat = (pool.shape[0], -1, *pool.shape[-2:])
                # layer by layer: a pool pinned per layer (io/pinned.RegionPinned) is one registration per layer,
                # and a copy-engine copy spanning two failed on an H100 (invalid argument)
                for dst, src in zip(res.view(flat), pool.view(flat)):
                    dst[:total - first].copy_(src[first:total])
