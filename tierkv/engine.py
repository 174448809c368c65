"""Chunked prefill, the decode step and the generate loop, over any KVCache.

The loop keeps the next token on the device; the only host sync per token is reading it back for
detokenization, outside the step itself.
"""

from __future__ import annotations

import sys

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from tqdm import tqdm

from tierkv.kv.caches.base import KVCache
from tierkv.models.llama import LlamaModel
from tierkv.sample import Sampler
from tierkv.sample_config import SamplingConfig


@dataclass
class GenStats:
    """Timings and sizes of one generate call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # every decode step, the first included
    # the first decode step alone: it captures the CUDA graph and compiles kernels, so per-token rates leave it out
    first_step_s: float = 0.0
    stop_reason: str = ""  # stop_token, stop_string, max_new_tokens, context_full ("" while running)
    extra: dict = field(default_factory=dict)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    def steady(self) -> tuple[int, float]:
        """(steps, seconds) of the decode steps after the first, which alone captures and compiles; all steps
        when there is only one. The first new token comes from prefill; decode steps produce the rest."""
        steps = max(self.new_tokens - 1, 0)
        if steps >= 2:
            return steps - 1, self.decode_s - self.first_step_s
        return steps, self.decode_s

    @property
    def decode_tok_s(self) -> float:
        steps, s = self.steady()
        return steps / s if s > 0 else 0.0

    @property
    def decode_ms_per_token(self) -> float:
        steps, s = self.steady()
        return 1000.0 * s / steps if steps else 0.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model: LlamaModel, ids: torch.Tensor, cache: KVCache, chunk: int, *, progress: bool = False,
            all_logits: bool = False, by_layer: bool = True, device_limit: int | None = None) -> torch.Tensor:
    """Feed ids (T,) through the model in slices of `chunk` tokens, appending to cache (mutates it).

    A cache that takes it (`begin_layer_prefill`; by_layer=False never asks) is filled layer after layer, with
    the same logits; device_limit (LLM.device_limit) caps the device memory that takes. Returns logits of the last
    token (1, V), or of every token (T, V) when all_logits.
    """
    n, start = ids.shape[0], cache.seq_len
    model.rope.ensure(start + n + 1)
    if by_layer and not all_logits and n > chunk and \
            cache.begin_layer_prefill(n, model.layer_prefill_bytes(n), device_limit):
        bar = tqdm(total=model.cfg.num_layers, desc="prefill", unit="layer",
                   disable=not (progress and sys.stderr.isatty()), leave=False)
        pos = torch.arange(start, start + n, device=ids.device)
        try:
            logits = model.forward_by_layer(ids, pos, cache, chunk, on_layer=lambda i: bar.update(1))
        finally:
            cache.end_layer_prefill()  # after the model let go of its whole-prompt activations
        bar.close()
        return logits
    outs = []
    bar = tqdm(total=n, desc="prefill", unit="tok", disable=not (progress and sys.stderr.isatty()) or n <= chunk, leave=False)
    for i in range(0, n, chunk):
        piece = ids[i:i + chunk]
        pos = torch.arange(start + i, start + i + piece.shape[0], device=ids.device)
        outs.append(model.forward(piece, pos, cache, last_only=not all_logits))
        bar.update(piece.shape[0])
    bar.close()
    return torch.cat(outs) if all_logits else outs[-1]


DecodeStep = Callable[[torch.Tensor, int], torch.Tensor]


def eager_step(model: LlamaModel, cache: KVCache) -> DecodeStep:
    """A decode step that runs the forward eagerly: (token (1,), position) -> logits (1, V)."""
    def step(token: torch.Tensor, position: int) -> torch.Tensor:
        model.rope.ensure(position + 1)  # a host-side length check; grows the tables only when crossed
        pos = torch.full((1,), position, dtype=torch.long, device=token.device)
        return model.forward(token, pos, cache)
    return step


def generate_ids(step: DecodeStep, first_logits: torch.Tensor, start_pos: int, max_new_tokens: int,
                 stop_ids: set[int], stats: GenStats, *, sampler: Sampler | None = None) -> Iterator[int]:
    """Yield up to max_new_tokens token ids, stopping after a stop id (greedy without a sampler). Times decode
    into stats and records why it stopped in stats.stop_reason ("stop_token" or "max_new_tokens")."""
    device = first_logits.device
    choose = sampler or Sampler(SamplingConfig(), device)
    token = choose(first_logits[-1]).view(1)
    t0 = time.perf_counter()
    for i in range(max_new_tokens):
        tid = int(token.item())  # the one host read per token, between steps
        stats.new_tokens += 1
        if i > 0:
            stats.decode_s = time.perf_counter() - t0
        if i == 1:
            stats.first_step_s = stats.decode_s
        yield tid
        if tid in stop_ids or i + 1 == max_new_tokens:
            stats.stop_reason = "stop_token" if tid in stop_ids else "max_new_tokens"
            break
        if i == 0:
            t0 = time.perf_counter()
        logits = step(token, start_pos + i)
        token = choose(logits[-1]).view(1)
    _sync(device)
