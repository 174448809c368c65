"""Rotary position embeddings: inverse frequencies for each supported scaling and the cos/sin tables.

Scalings: default, linear, llama3 (Llama 3.1), yarn. Tables are computed once and grown on demand; the
kernels (tierkv.kernels.qk_rope) index them with a position tensor on the device (no host sync).
"""

from __future__ import annotations

import math

import torch

from tierkv.errors import UnsupportedModelError
from tierkv.models.config import ModelConfig

SUPPORTED_SCALINGS = ("default", "linear", "llama3", "yarn")


def inverse_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,) float32, attention factor applied to cos/sin) for the config's RoPE scaling."""
    d = cfg.head_dim
    base = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).double() / d))  # (D/2,)
    s = cfg.rope_scaling
    kind = s.get("rope_type", "default")
    if kind == "default":
        return base.float(), 1.0
    if kind == "linear":
        return (base / float(s["factor"])).float(), 1.0
    if kind == "llama3":
        return _llama3(base, s).float(), 1.0
    if kind == "yarn":
        return _yarn(base, s, cfg)
    raise UnsupportedModelError(f"RoPE scaling {kind!r} is not supported; tierkv supports {', '.join(SUPPORTED_SCALINGS)}")


def _llama3(inv: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
    factor, lo, hi = float(s["factor"]), float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_ctx = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    mid = (1 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen > old_ctx / lo, inv / factor, inv)
    between = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(between, mid, out)


def _yarn(inv: torch.Tensor, s: dict, cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    # NTK-by-parts: dimensions rotating many times in the old context keep their frequency, slow ones interpolate.
    factor = float(s["factor"])
    old_ctx = float(s.get("original_max_position_embeddings") or cfg.max_position_embeddings)
    beta_fast, beta_slow = float(s.get("beta_fast") or 32), float(s.get("beta_slow") or 1)
    d = cfg.head_dim

    def dim_for(rotations: float) -> float:
        return (d * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(cfg.rope_theta))

    lo = max(math.floor(dim_for(beta_fast)), 0)
    hi = min(math.ceil(dim_for(beta_slow)), d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the original frequency is kept
    out = (inv / factor) * (1 - keep) + inv * keep
    mscale = s.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return out.float(), float(mscale)


class Rope:
    """cos/sin tables (S, D) for one model on one device; `apply` rotates q or k at given positions."""

    def __init__(self, cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, length: int = 4096, *,
                 companions: tuple["Rope", ...] = ()) -> None:
        self.inv_freq, self.factor = inverse_frequencies(cfg)
        self.device, self.dtype = torch.device(device), dtype
        self.cos = self.sin = torch.empty(0)
        # other tables of the same model (Gemma 3's sliding layers) grown with this one: callers that size the
        # model's positions (engine.prefill, graph capture) call `model.rope.ensure` only
        self.companions = companions
        self.ensure(length)

    def ensure(self, length: int) -> None:
        """Grow the tables (and the companions') to cover positions [0, length). Mutates; call outside captured
        graphs."""
        for other in self.companions:
            other.ensure(length)
        if self.cos.shape[0] >= length:
            return
        n = max(length, 2 * self.cos.shape[0])
        freqs = torch.outer(torch.arange(n, dtype=torch.float32), self.inv_freq)  # (S, D/2)
        emb = torch.cat([freqs, freqs], dim=-1)  # (S, D)
        self.cos = (emb.cos() * self.factor).to(self.device, self.dtype)
        self.sin = (emb.sin() * self.factor).to(self.device, self.dtype)
