"""Low-rank shadows of one layer's pre-RoPE keys (A (S, r) @ B (r, Hkv*D)) and the exact outlier chunks.

Sparse decode rebuilds picked keys as RoPE(A[t] @ B) instead of reading them; chunks the shadow reconstructs
badly keep exact post-RoPE keys on the device. `fit_basis` is the truncated SVD (via the Gram matrix).
"""

from __future__ import annotations

import torch

from tierkv.kernels import rebuild_keys


def fit_basis(x: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` right singular vectors of x (S, F): basis (r, F) fp32 with orthonormal rows, and the energy
    sum(x**2) - ||x @ basis.T||**2 the rank-r projection drops (fp32 scalar: the SVD's predicted squared error).

    Uses the eigenvectors of the Gram matrix x.T @ x (F x F, accumulated in fp32, solved in fp64): the same
    subspace as the SVD of x at S*F^2 cost, and it can be summed over prefill slices. Does not mutate x.
    """
    xf = x.float()
    return basis_from_gram(xf.T @ xf, rank)


def fold_due(total: int, covered: int, chunk_size: int, fold_tokens: int) -> bool:
    """The fold rule of both sparse caches: fold once >= fold_tokens sealed tokens (of `total`) lie beyond the
    `covered` tokens the shadow holds."""
    return (total // chunk_size) * chunk_size - covered >= fold_tokens


def grown_capacity(need: int, cap: int) -> int:
    """Rows to allocate when a per-token buffer of `cap` rows must hold `need`: an eighth more than now, not
    double, since at long context these buffers are GiBs of GPU memory outside the KV budget."""
    return max(need, cap + cap // 8 + 256)


def basis_from_gram(gram: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_basis` from the Gram matrix x.T @ x (F, F) fp32, which callers may sum over slices of x. A batch
    (..., F, F) gives (..., r, F) bases and (...) dropped energies in one eigensolver call (on CUDA one call, not
    one per head: each call ends in a host sync)."""
    evals, evecs = torch.linalg.eigh(gram.double())  # ascending
    f = gram.shape[-1]
    r = min(rank, f)
    basis = evecs[..., -r:].flip(-1).transpose(-1, -2).float().contiguous()  # (..., r, F), largest first
    dropped = evals[..., :-r].clamp_min(0).sum(-1).float() if r < f else evals.new_zeros(evals.shape[:-1]).float()
    return basis, dropped


class KeyShadow:
    """One layer's key shadow: coefficients A (S_cap, r), basis B (r, Hkv*D), exact outlier chunks.

    Tokens [0, covered) have coefficients; later tokens are exact elsewhere (open chunk, window, tiers) until
    `fold` projects them onto B. A chunk whose relative reconstruction error exceeds `outlier_threshold`
    keeps its exact post-RoPE keys here and `keys` returns those instead of a rebuild.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, rank: int, chunk_size: int, *,
                 outlier_threshold: float, device: torch.device, dtype: torch.dtype, keep_exact: bool = True) -> None:
        self.hkv, self.d, self.c = num_kv_heads, head_dim, chunk_size
        self.rank = min(rank, num_kv_heads * head_dim)
        self.threshold, self.dtype = outlier_threshold, dtype
        # keep_exact=False: outliers are only marked (chunk_err > threshold); the caller reads their exact keys
        # elsewhere (the graph-safe sparse cache reads them in place from pinned host memory)
        self.keep_exact = keep_exact
        self.coeffs = torch.zeros((0, self.rank), device=device, dtype=dtype)  # (S_cap, r)
        self.basis: torch.Tensor | None = None  # (r, Hkv*D)
        self.covered = 0
        self.chunk_err = torch.zeros(0, device=device)  # (chunks,) relative error of covered chunks, fp32
        self.outlier_slot = torch.zeros(0, dtype=torch.long, device=device)  # (chunks,) row in exact, -1 if none
        self.exact = torch.zeros((0, chunk_size, num_kv_heads, head_dim), device=device, dtype=dtype)
        self.predicted_sq_err = torch.zeros((), device=device)  # dropped energy of the fit (fp32)

    def reserve(self, tokens: int) -> None:
        """Allocate room for `tokens` coefficients and their chunks now, so later folds write in place (CUDA graphs
        hold buffer addresses). Mutates; keeps what is stored."""
        if tokens > self.coeffs.shape[0]:
            grown = self.coeffs.new_zeros((tokens, self.rank))
            grown[:self.covered] = self.coeffs[:self.covered]
            self.coeffs = grown
        self._grow_chunks(-(-tokens // self.c))

    @property
    def fitted(self) -> bool:
        return self.basis is not None

    @property
    def nbytes(self) -> int:
        """Device bytes of the coefficients, exact outlier chunks, per-chunk errors and slots, and the basis,
        counted before the fit makes it (resident copies sized beside the shadow leave it room)."""
        n = self.coeffs.numel() * self.coeffs.element_size() + self.exact.numel() * self.exact.element_size()
        n += self.chunk_err.numel() * 4 + self.outlier_slot.numel() * 8 + 4  # + predicted_sq_err
        return n + self.rank * self.hkv * self.d * self.coeffs.element_size()

    def fit(self, k_pre: torch.Tensor, k_post: torch.Tensor) -> None:
        """Take the truncated SVD of k_pre (S, Hkv, D) (tokens 0..S-1) and cover them. Mutates; S % chunk == 0
        is not required (a partial last chunk is covered but judged for outliers only when folded whole)."""
        flat = k_pre.reshape(k_pre.shape[0], -1)  # (S, Hkv*D)
        basis, dropped = fit_basis(flat, self.rank)
        self.basis = basis.to(self.dtype)
        self.predicted_sq_err = dropped
        self.covered = 0
        self.fold(k_pre, k_post)

    def fit_gram(self, gram: torch.Tensor) -> None:
        """Take the basis from the Gram matrix (Hkv*D, Hkv*D) of the pre-RoPE keys; nothing is covered yet:
        the caller folds the tokens in, chunk-aligned slices at a time (bounded memory). Mutates."""
        basis, self.predicted_sq_err = basis_from_gram(gram, self.rank)
        self.set_basis(basis)
        self.covered = 0

    def set_basis(self, basis: torch.Tensor) -> None:
        """Take basis (r, Hkv*D), written into the current basis's storage when the shapes match (a captured CUDA
        graph holds its address: a refit then needs no new capture). Mutates."""
        basis = basis.to(self.dtype)
        if self.basis is not None and self.basis.shape == basis.shape:
            self.basis.copy_(basis)
        else:
            self.basis = basis.contiguous()

    def fold(self, k_pre: torch.Tensor, k_post: torch.Tensor) -> None:
        """Project tokens [covered, covered+T) (k_pre, k_post: (T, Hkv, D)) onto the basis; mark outliers.

        Whole chunks only are judged: callers fold chunk-aligned runs (the cache folds sealed chunks). Mutates.
        """
        t = k_pre.shape[0]
        if t == 0:
            return
        flat = k_pre.reshape(t, -1).float()  # (T, Hkv*D)
        b = self.basis.float()
        a = flat @ b.T  # (T, r)
        start, end = self.covered, self.covered + t
        if end > self.coeffs.shape[0]:
            grown = self.coeffs.new_zeros((grown_capacity(end, self.coeffs.shape[0]), self.rank))
            grown[:start] = self.coeffs[:start]
            self.coeffs = grown
        self.coeffs[start:end] = a.to(self.dtype)
        self.covered = end
        self._judge(start, flat - a @ b, flat, k_post)

    def unfold(self, to: int) -> None:
        """Forget the coefficients of tokens [to, covered): the tokens a rollback removed folded in, so that the
        next fold projects them again. `to` is an earlier `covered` (chunk-aligned); only without kept exact keys
        (keep_exact=False: their rows could not be given back). Mutates; the stale rows are never read."""
        if self.keep_exact or to % self.c or not 0 <= to <= self.covered:
            raise ValueError(f"cannot unfold a shadow covering {self.covered} tokens to {to}")
        self.chunk_err[to // self.c:] = 0
        self.covered = to

    def _judge(self, start: int, resid: torch.Tensor, flat: torch.Tensor, k_post: torch.Tensor) -> None:
        """Relative error per whole chunk in [start, start+T); keep exact keys of chunks above the threshold."""
        c = self.c
        first = -(-start // c)  # first chunk wholly inside the run
        last = (start + resid.shape[0]) // c  # one past the last whole chunk
        if last <= first:
            return
        lo = first * c - start
        n = last - first
        r2 = resid[lo:lo + n * c].pow(2).view(n, -1).sum(-1)  # (n,)
        x2 = flat[lo:lo + n * c].pow(2).view(n, -1).sum(-1).clamp_min(1e-30)
        err = (r2 / x2).sqrt()  # (n,)
        self._grow_chunks(last)
        self.chunk_err[first:last] = err
        if not self.keep_exact:
            return
        bad = (err > self.threshold).nonzero().flatten()  # host sync, at fit/fold time only
        if bad.numel():
            rows = k_post[lo:lo + n * c].view(n, c, self.hkv, self.d)[bad]  # (nb, C, Hkv, D)
            self.outlier_slot[first + bad] = torch.arange(bad.numel(), device=bad.device) + self.exact.shape[0]
            self.exact = torch.cat([self.exact, rows.to(self.dtype)])

    def _grow_chunks(self, n: int) -> None:
        if n > self.chunk_err.shape[0]:
            pad = n - self.chunk_err.shape[0]
            self.chunk_err = torch.cat([self.chunk_err, self.chunk_err.new_zeros(pad)])
            self.outlier_slot = torch.cat([self.outlier_slot, self.outlier_slot.new_full((pad,), -1)])

    @property
    def num_outliers(self) -> int:
        """Outlier chunks whose exact keys are kept here (0 with keep_exact=False)."""
        return self.exact.shape[0]

    @property
    def outlier_chunks(self) -> int:
        """Chunks judged outliers (kept exact here or read exact elsewhere). Host sync."""
        return int((self.chunk_err > self.threshold).sum())

    def is_outlier(self, chunks: torch.Tensor | slice) -> torch.Tensor:
        """bool (n,): whether each covered chunk of `chunks` ((n,) int64 or a slice of chunk indices) was judged an
        outlier. No host sync."""
        return self.chunk_err[chunks] > self.threshold

    def keys(self, chunks: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Post-RoPE keys (n*C, Hkv, D) of covered chunks `chunks` (n,) int64: RoPE(A[t] @ B) at t, exact for
        outlier chunks. cos/sin: (S_max, D) tables. Does not mutate; no host sync."""
        c = self.c
        tok = (chunks.unsqueeze(1) * c + torch.arange(c, device=chunks.device)).reshape(-1)  # (n*C,)
        keys = rebuild_keys(self.coeffs, self.basis, tok, cos, sin, out_dtype=self.dtype)  # (n*C, Hkv, D)
        slot = self.outlier_slot[chunks]  # (n,)
        if self.exact.shape[0]:
            exact = self.exact[slot.clamp_min(0)].reshape(-1, self.hkv, self.d)  # (n*C, Hkv, D)
            use = (slot >= 0).repeat_interleave(c).view(-1, 1, 1)
            keys = torch.where(use, exact, keys)
        return keys
