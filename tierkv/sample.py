"""Next-token choice on the device without host syncs: greedy, temperature, top-k, top-p, min-p, repeat penalty.

Sampling uses the exponential-race form of the Gumbel trick (argmax of p / E, E ~ Exp(1)), which needs
no multinomial call and so no synchronisation. Every filter keeps at least the most likely token, so greedy
decoding (temperature 0) is a plain argmax of the (penalised) logits.
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from tierkv.sample_config import SamplingConfig


def sampling_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """logits (V,) -> the distribution sampling draws from at cfg.temperature > 0: float32 (V,), sums to 1.

    Order: temperature, top-k, top-p (the smallest prefix reaching the mass), min-p (relative to the top token).
    """
    scaled = logits.float() / cfg.temperature
    if 0 < cfg.top_k < scaled.shape[-1]:
        kth = scaled.topk(cfg.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p >= cfg.top_p  # mass before this token already reached top_p
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    if cfg.min_p > 0.0:
        probs = probs.masked_fill(probs < cfg.min_p * probs.max(), 0.0)
    return probs / probs.sum()


def penalize_repeats(logits: torch.Tensor, recent: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (V,) with every token id in recent (N,) made less likely by `penalty`: a positive logit is divided
    by it, a negative one multiplied. Returns a new tensor."""
    seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device).scatter_(0, recent, True)
    lowered = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, lowered, logits)


def sample(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (V,) -> token id, a 0-d long tensor on the same device. Does not mutate logits."""
    if cfg.greedy:
        return logits.argmax(-1)
    probs = sampling_probs(logits, cfg)
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    return (probs / race).argmax(-1)


class Sampler:
    """Picks the tokens of one sequence: its settings, its random generator and, with a repeat penalty, a ring of
    the last `repeat_window` token ids on the device (filled from the prompt, updated without host syncs)."""

    def __init__(self, cfg: SamplingConfig, device: torch.device, prompt_ids: Sequence[int] = ()) -> None:
        self.cfg = cfg
        self.generator = None
        if not cfg.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(cfg.seed if cfg.seed is not None else time.time_ns() % (1 << 62))
        self.recent: torch.Tensor | None = None
        self._next_slot = 0
        if cfg.repeat_penalty != 1.0 and len(prompt_ids):
            tail = list(prompt_ids[-cfg.repeat_window:])
            # a short prompt repeats its own ids: the ring is read as a set, so duplicates change nothing
            ring = (tail * (cfg.repeat_window // len(tail) + 1))[:cfg.repeat_window]
            self.recent = torch.tensor(ring, dtype=torch.long, device=device)
            self._next_slot = len(tail) % cfg.repeat_window

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) -> the next token (0-d long tensor on the device), remembered for the repeat penalty."""
        cfg = self.cfg
        if cfg.repeat_penalty != 1.0 and self.recent is not None:
            logits = penalize_repeats(logits, self.recent, cfg.repeat_penalty)
        token = sample(logits, cfg, self.generator)
        if cfg.repeat_penalty != 1.0:
            self._remember(token)
        return token

    def _remember(self, token: torch.Tensor) -> None:
        if self.recent is None:  # no prompt ids: the first token fills the ring
            self.recent = token.view(1).expand(self.cfg.repeat_window).clone()
        else:
            self.recent[self._next_slot] = token  # a device-side copy, no sync
        self._next_slot = (self._next_slot + 1) % self.cfg.repeat_window
