"""Per-layer chunk scoring data kept on the device, and top-k chunk picks for a decode query.

`LowRankIndex` (the default): every token's post-RoPE key projected to rank r per KV head (or shared), stored as
int8 rows with one fp32 scale each, scores summed per chunk as softmax mass (kernels.chunk_topk).
`ChunkLandmarks`: a chunk-mean or min/max landmark.
"""

from __future__ import annotations

import math

import torch

from tierkv.kernels import chunk_topk
from tierkv.kernels.append_token import quantize_rows
from tierkv.kernels.chunk_topk import select_top_chunks
from tierkv.kv.sparse.shadow import basis_from_gram, fit_basis, grown_capacity

SCORERS = ("lowrank", "lowrank-shared", "mean", "minmax")


class LowRankIndex:
    """Low-rank projections of one layer's post-RoPE keys: basis P (Hkv, r, D) (or shared (r, Hkv*D)) in the model
    dtype, coefficients int8 (Hkv, S_cap, r) (or (S_cap, r)) with one fp32 scale per row, row_scale (Hkv, S_cap)
    (or (S_cap,)): A[t] ~= row_scale[t] * coeffs[t]. Costs S*(r+4) bytes read per KV head (per layer, if shared)
    per step, about half of bf16 coefficients at r=48."""

    def __init__(self, num_kv_heads: int, head_dim: int, rank: int, chunk_size: int, *, shared: bool,
                 reduce: str, device: torch.device, dtype: torch.dtype) -> None:
        self.hkv, self.d, self.c, self.shared, self.reduce, self.dtype = \
            num_kv_heads, head_dim, chunk_size, shared, reduce, dtype
        self.rank = min(rank, head_dim * (num_kv_heads if shared else 1))
        lead = () if shared else (num_kv_heads,)
        self.coeffs = torch.zeros((*lead, 0, self.rank), device=device, dtype=torch.int8)  # (Hkv?, S_cap, r)
        self.row_scale = torch.zeros((*lead, 0), device=device)  # (Hkv?, S_cap) fp32
        self.basis: torch.Tensor | None = None  # (Hkv, r, D) or (r, Hkv*D)
        self._b32_of: torch.Tensor | None = None  # the basis `basis32` was cast from
        self.count = 0

    @property
    def basis32(self) -> torch.Tensor:
        """The basis in fp32, cast once per basis (the decode step's projections would cast it every call)."""
        if self._b32_of is not self.basis:
            self._b32, self._b32_of = self.basis.float(), self.basis
        return self._b32

    @property
    def nbytes(self) -> int:
        """Device bytes of the coefficients, row scales and the basis with its fp32 copy (`basis32`; the basis
        itself in fp32). The basis is counted before the fit makes it, so resident copies sized beside the index
        leave it room."""
        basis = self.hkv * self.rank * self.d * (self.dtype.itemsize + (0 if self.dtype == torch.float32 else 4))
        return basis + self.coeffs.numel() * self.coeffs.element_size() + self.row_scale.numel() * 4

    def fit(self, k_post: torch.Tensor) -> None:
        """Fit the basis to k_post (S, Hkv, D), the layer's keys so far, and index them. Mutates."""
        if self.shared:
            self.basis = fit_basis(k_post.reshape(k_post.shape[0], -1), self.rank)[0].to(self.dtype)
        else:
            self.basis = torch.stack([fit_basis(k_post[:, h], self.rank)[0] for h in range(self.hkv)]).to(self.dtype)
        self.count = 0
        self.extend(k_post)

    def fit_grams(self, grams: torch.Tensor) -> None:
        """Per-KV-head bases from the Gram matrices (Hkv, D, D) of the keys (summed over slices by the caller);
        nothing is indexed yet: the caller extends with the keys. Mutates."""
        self.set_basis(basis_from_gram(grams, self.rank)[0])
        self.count = 0

    def set_basis(self, basis: torch.Tensor) -> None:
        """Take basis, written into the current basis's storage (and its fp32 copy) when the shapes match (a
        captured CUDA graph holds their addresses: a refit then needs no new capture). Mutates."""
        basis = basis.to(self.dtype)
        if self.basis is None or self.basis.shape != basis.shape:
            self.basis = basis.contiguous()
            return
        self.basis.copy_(basis)
        if self._b32_of is self.basis:
            self._b32.copy_(self.basis.float())

    def extend(self, k_post: torch.Tensor) -> None:
        """Index the next T tokens' keys k_post (T, Hkv, D) in the fixed basis. Mutates; no host sync."""
        t = k_post.shape[0]
        if self.shared:
            a = k_post.reshape(t, -1).float() @ self.basis.float().T  # (T, r)
        else:
            a = torch.einsum("thd,hrd->htr", k_post.float(), self.basis.float())  # (Hkv, T, r)
        end, cap = self.count + t, self.coeffs.shape[-2]
        if end > cap:
            self._grow(grown_capacity(end, cap))
        self.coeffs[..., self.count:end, :], self.row_scale[..., self.count:end] = quantize_rows(a)
        self.count = end

    def reserve(self, tokens: int) -> None:
        """Allocate room for `tokens` indexed tokens now, so later writes happen in place (CUDA graphs hold
        buffer addresses). Mutates; keeps what is indexed."""
        if tokens > self.coeffs.shape[-2]:
            self._grow(tokens)

    def _grow(self, cap: int) -> None:
        """Reallocate coeffs and row_scale with room for cap tokens, keeping the first `count`. Mutates."""
        n = self.count
        coeffs = self.coeffs.new_zeros((*self.coeffs.shape[:-2], cap, self.rank))  # (Hkv?, cap, r)
        coeffs[..., :n, :] = self.coeffs[..., :n, :]
        row_scale = self.row_scale.new_zeros((*self.row_scale.shape[:-1], cap))  # (Hkv?, cap)
        row_scale[..., :n] = self.row_scale[..., :n]
        self.coeffs, self.row_scale = coeffs, row_scale

    def write_at(self, pos: torch.Tensor, k_post: torch.Tensor) -> None:
        """Index one token's keys k_post (1, Hkv, D) at the device position pos (1,), in reserved room. Graph-safe:
        no host sync, no reallocation; the caller advances `count`. Per-KV-head indexes only."""
        a = torch.bmm(k_post[0].unsqueeze(1).float(), self.basis32.transpose(1, 2))  # (Hkv, 1, r)
        qa, sa = quantize_rows(a)  # (Hkv, 1, r) int8, (Hkv, 1) fp32
        self.coeffs.index_copy_(1, pos, qa)
        self.row_scale.index_copy_(1, pos, sa)

    def project_query(self, q: torch.Tensor) -> torch.Tensor:
        """q (Hq, D) in the index's low-rank space, grouped by KV head: (Hkv, G, r) in the model dtype (the
        scoring kernel dots it with the int8 rows converted to this dtype, exactly)."""
        qg = q.float().view(self.hkv, -1, self.d)  # (Hkv, G, D)
        if self.shared:
            b = self.basis32.view(self.rank, self.hkv, self.d).permute(1, 2, 0)  # (Hkv, D, r)
            return torch.bmm(qg, b).to(self.dtype)
        return torch.bmm(qg, self.basis32.transpose(1, 2)).to(self.dtype)

    def top_chunks(self, q: torch.Tensor, first: int, select_end: int, k: int) -> torch.Tensor:
        """Ids (Hkv, k) of the k best chunks in [first, select_end) per KV head for query q (Hq, D)."""
        coeffs, row_scale = self.coeffs[..., :self.count, :], self.row_scale[..., :self.count]
        ids, _ = chunk_topk(self.project_query(q), coeffs, self.count, select_end, k, self.c,
                            1.0 / math.sqrt(self.d), first, self.reduce, row_scale=row_scale)
        return ids


class ChunkLandmarks:
    """Chunk-mean ("mean") or per-dimension min/max ("minmax") landmarks of post-RoPE keys, (Hkv, chunks, D)."""

    def __init__(self, num_kv_heads: int, head_dim: int, chunk_size: int, *, kind: str,
                 device: torch.device) -> None:
        self.hkv, self.d, self.c, self.kind = num_kv_heads, head_dim, chunk_size, kind
        self.lo = torch.zeros((num_kv_heads, 0, head_dim), device=device)  # (Hkv, chunks, D) mean or min
        self.hi = torch.zeros((num_kv_heads, 0, head_dim), device=device)  # max (minmax only)
        self.tail = torch.zeros((0, num_kv_heads, head_dim), device=device)  # tokens of the unfinished chunk

    @property
    def nbytes(self) -> int:
        return (self.lo.numel() + (self.hi.numel() if self.kind == "minmax" else 0)) * 4

    def fit(self, k_post: torch.Tensor) -> None:
        self.extend(k_post)

    def extend(self, k_post: torch.Tensor) -> None:
        """Add tokens k_post (T, Hkv, D); landmarks of completed chunks are appended. Mutates."""
        x = torch.cat([self.tail, k_post.float()])
        n = x.shape[0] // self.c
        self.tail = x[n * self.c:]
        if n:
            xc = x[:n * self.c].view(n, self.c, self.hkv, self.d).permute(2, 0, 1, 3)  # (Hkv, n, C, D)
            lo = xc.mean(2) if self.kind == "mean" else xc.amin(2)
            self.lo = torch.cat([self.lo, lo], dim=1)
            if self.kind == "minmax":
                self.hi = torch.cat([self.hi, xc.amax(2)], dim=1)

    def top_chunks(self, q: torch.Tensor, first: int, select_end: int, k: int) -> torch.Tensor:
        qg = q.float().view(self.hkv, -1, self.d)  # (Hkv, G, D)
        if self.kind == "mean":
            red = torch.bmm(qg, self.lo.transpose(1, 2))  # (Hkv, G, chunks)
        else:  # Quest's upper bound of q . k over the chunk
            red = torch.maximum(qg.unsqueeze(2) * self.lo.unsqueeze(1), qg.unsqueeze(2) * self.hi.unsqueeze(1)).sum(-1)
        ids, _ = select_top_chunks(red / math.sqrt(self.d), select_end, k, first, "max")
        return ids


def make_index(kind: str, num_kv_heads: int, head_dim: int, rank: int, chunk_size: int, *,
                device: torch.device, dtype: torch.dtype, reduce: str = "mass"):
    """A fresh scorer of `kind` (one of SCORERS) for one layer."""
    if kind in ("lowrank", "lowrank-shared"):
        return LowRankIndex(num_kv_heads, head_dim, rank, chunk_size, shared=kind == "lowrank-shared",
                            reduce=reduce, device=device, dtype=dtype)
    if kind in ("mean", "minmax"):
        return ChunkLandmarks(num_kv_heads, head_dim, chunk_size, kind=kind, device=device)
    raise ValueError(f"scorer {kind!r} is unknown; use one of {SCORERS}")
