"""What a sparse cache holds beyond K/V, as named tensors for a session file, and back: key shadows, score
indexes and the inverse RoPE that recovers pre-RoPE keys from stored post-RoPE keys.

The state is saved rather than rebuilt on load: a layer's shadow and index are fitted at its first sparse step
on the keys seen so far and later keys are folded in, so a refit at load time would fit other data and change
later picks (and the pre-RoPE keys of folded tokens are kept nowhere). No pickle: tensors only.
"""

from __future__ import annotations

import torch

from tierkv.errors import ConfigError
from tierkv.kernels.rope import rotate_half
from tierkv.kv.sparse.shadow import KeyShadow
from tierkv.kv.sparse.index import SCORERS, ChunkLandmarks, LowRankIndex

STATE_VERSION = 2  # 2: the score index holds int8 coefficients and fp32 row scales


def unrope(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pre-RoPE keys of post-RoPE keys k (n, H, D) at positions [0, n); cos/sin: (>= n, D) tables.

    Inverts y = x*cos + rotate_half(x)*sin (any scale, e.g. YaRN's attention factor) in fp32; equal to the
    model's pre-RoPE keys up to rounding. Does not mutate.
    """
    n = k.shape[0]
    c, s = cos[:n].float().unsqueeze(1), sin[:n].float().unsqueeze(1)  # (n, 1, D)
    kf = k.float()
    return ((kf * c - rotate_half(kf) * s) / (c * c + s * s).clamp_min(1e-30)).to(k.dtype)


class PendingKeys:
    """The pre-RoPE keys (n, H, D) a fit is waiting for, without a host copy of them all: positions [0, upto)
    un-rotated from the stored post-RoPE keys `post` only when a slice is asked for (on post's device), the rest
    from `tail`. Slicing is all the fit needs, so a refit after a rollback or a session import reads the pool
    slice by slice, as the prefill's fit reads its device copies, instead of a GiB-sized host round trip."""

    def __init__(self, post: torch.Tensor, upto: int, tail: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        self.post, self.upto, self.tail, self.cos, self.sin = post, upto, tail, cos, sin
        self.shape = (upto + tail.shape[0], *tail.shape[1:])

    def __getitem__(self, sl: slice) -> torch.Tensor:
        s, e, _ = sl.indices(self.shape[0])
        cut = max(s, min(e, self.upto))  # [s, cut) from the pool, [cut, e) from the tail
        tail = self.tail[cut - self.upto:e - self.upto].to(self.post.device) if e > cut else None
        if cut == s:
            return tail if tail is not None else self.tail[:0].to(self.post.device)
        head = unrope(self.post[s:cut], self.cos[s:], self.sin[s:])
        return head if tail is None else torch.cat([head, tail])


def take_tokens(buf: list[tuple[torch.Tensor, torch.Tensor]], n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n tokens of a list of (k_pre, k) runs (T, Hkv, D), without copying the runs kept whole."""
    out, left = [], n
    for pre, post in buf:
        if left <= 0:
            break
        out.append((pre[:left], post[:left]) if pre.shape[0] > left else (pre, post))
        left -= pre.shape[0]
    return out


def _int(x: int) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.int64)


def pack_shadow(sh: KeyShadow, prefix: str) -> dict[str, torch.Tensor]:
    """A fitted shadow's state: basis, coefficients of [0, covered), per-chunk errors, outliers. Does not mutate."""
    return {f"{prefix}covered": _int(sh.covered), f"{prefix}basis": sh.basis, f"{prefix}coeffs": sh.coeffs[:sh.covered],
            f"{prefix}chunk_err": sh.chunk_err, f"{prefix}outlier_slot": sh.outlier_slot, f"{prefix}exact": sh.exact,
            f"{prefix}predicted_sq_err": sh.predicted_sq_err}


def unpack_shadow(sh: KeyShadow, t: dict[str, torch.Tensor], prefix: str) -> None:
    """Restore `pack_shadow`'s tensors into a fresh shadow of the same shape. Mutates sh."""
    dev = sh.coeffs.device
    basis = checked(t, f"{prefix}basis", (sh.rank, sh.hkv * sh.d), sh.dtype)
    covered = int(t[f"{prefix}covered"])
    sh.basis, sh.covered = basis.to(dev), covered
    sh.coeffs = checked(t, f"{prefix}coeffs", (covered, sh.rank), sh.dtype).to(dev)
    sh.exact = checked(t, f"{prefix}exact", (None, sh.c, sh.hkv, sh.d), sh.dtype).to(dev)
    sh.chunk_err = t[f"{prefix}chunk_err"].to(dev)
    sh.outlier_slot = t[f"{prefix}outlier_slot"].to(dev)
    sh.predicted_sq_err = t[f"{prefix}predicted_sq_err"].to(dev)


def pack_index(sc, prefix: str) -> dict[str, torch.Tensor]:
    """A fitted scorer's state (LowRankIndex: basis, the int8 coefficients and row scales of indexed tokens;
    landmarks)."""
    if isinstance(sc, LowRankIndex):
        return {f"{prefix}basis": sc.basis, f"{prefix}coeffs": sc.coeffs[..., :sc.count, :],
                f"{prefix}row_scale": sc.row_scale[..., :sc.count]}
    if isinstance(sc, ChunkLandmarks):
        return {f"{prefix}lo": sc.lo, f"{prefix}hi": sc.hi, f"{prefix}tail": sc.tail}
    raise TypeError(f"no session state for scorer {type(sc).__name__}")


def unpack_index(sc, t: dict[str, torch.Tensor], prefix: str) -> None:
    """Restore `pack_index`'s tensors into a fresh scorer of the same kind and shape. Mutates sc."""
    dev = sc.coeffs.device if isinstance(sc, LowRankIndex) else sc.lo.device
    if isinstance(sc, LowRankIndex):
        lead = () if sc.shared else (sc.hkv,)
        shape = (sc.rank, sc.hkv * sc.d) if sc.shared else (sc.hkv, sc.rank, sc.d)
        sc.basis = checked(t, f"{prefix}basis", shape, sc.dtype).to(dev)
        sc.coeffs = checked(t, f"{prefix}coeffs", (*lead, None, sc.rank), torch.int8).to(dev)
        sc.count = sc.coeffs.shape[-2]
        sc.row_scale = checked(t, f"{prefix}row_scale", (*lead, sc.count), torch.float32).to(dev)
    else:
        sc.lo, sc.hi, sc.tail = (t[f"{prefix}{n}"].to(dev) for n in ("lo", "hi", "tail"))


def trim_index(sc, n: int, keys) -> None:
    """Forget indexed tokens >= n. keys(start, end) -> post-RoPE keys (end-start, Hkv, D) from the tiers, read
    only by landmark scorers (whose unfinished chunk is rebuilt). Mutates sc."""
    if isinstance(sc, LowRankIndex):
        sc.count = min(sc.count, n)  # rows past count are overwritten by the next extend
        return
    whole = n // sc.c
    sc.lo, sc.hi = sc.lo[:, :whole], sc.hi[:, :whole]
    sc.tail = keys(whole * sc.c, n).float()


def meta(chunk_size: int, rank: int, score_rank: int, scorer: str, seq_len: int) -> torch.Tensor:
    """The settings a saved sparse state depends on, with the format version, as one int64 tensor."""
    return torch.tensor([STATE_VERSION, chunk_size, rank, score_rank, SCORERS.index(scorer), seq_len])


def check_meta(saved: torch.Tensor, mine: torch.Tensor) -> None:
    """Raise ConfigError naming the first setting in which a saved sparse state differs from this cache."""
    names = ["state format", "chunk_size", "rank", "score rank", "scorer", "tokens"]
    for name, a, b in zip(names, saved.tolist(), mine.tolist()):
        if a != b:
            if name == "state format":  # no setting brings an older format back (v1 kept the index unquantised)
                raise ConfigError(f"the saved sparse state has format {a} but this tierkv reads format {b}; start "
                                  f"the session again from its text")
            if name == "scorer":
                a, b = SCORERS[a] if 0 <= a < len(SCORERS) else a, SCORERS[b]
            raise ConfigError(f"the saved sparse state has {name}={a} but this cache has {b}; load it with the "
                              f"settings it was saved with")


def checked(t: dict[str, torch.Tensor], name: str, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """t[name], checked against shape (None: any size) and dtype; ConfigError naming it otherwise."""
    x = t.get(name)
    if x is None:
        raise ConfigError(f"the saved sparse state lacks {name!r}; save the session again")
    ok = x.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, x.shape))
    if not ok or x.dtype != dtype:
        raise ConfigError(f"the saved sparse state's {name} is {tuple(x.shape)} {x.dtype}, this cache expects "
                          f"{shape} {dtype}; load it with the settings it was saved with")
    return x
