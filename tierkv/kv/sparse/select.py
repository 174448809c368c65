"""Token budget -> chunk picks: which chunks a sparse decode step attends, per KV head.

Sinks (the first chunks) and the local window (the newest sealed chunks plus the open chunk) are always
attended; the rest of the budget goes to the top-scoring chunks in between, chosen per KV head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from tierkv.config import TierConfig


class ClassSizes(NamedTuple):
    """The chunk counts a sparse cache of one capacity class is built with (and its kernels specialise on)."""
    chunk: int
    n_chunks: int  # chunks the capacity rounds up to
    max_picks: int  # chunks per KV head a step may pick: the token budget at full capacity, in chunks
    sink_chunks: int
    window_chunks: int

    @property
    def capacity(self) -> int:
        return self.n_chunks * self.chunk


def class_sizes(config: TierConfig, capacity: int) -> ClassSizes:
    """ClassSizes of a sparse cache (kv/caches/sparse.py) that holds `capacity` positions under `config`."""
    c = config.chunk_size
    n_chunks = -(-max(1, capacity) // c)
    max_picks = max(1, min(n_chunks, config.budget_tokens(n_chunks * c) // c))
    return ClassSizes(c, n_chunks, max_picks, -(-config.sink_tokens // c), -(-config.window_tokens // c))


@dataclass(frozen=True)
class SelectionPlan:
    """Chunk ranges of one decode step. Sealed chunks [0, sink_end) and [window_start, sealed) plus the open
    chunk are always attended; `picks` chunks per KV head come from [sink_end, window_start)."""

    sealed: int
    sink_end: int
    window_start: int
    picks: int
    chunk_size: int

    @property
    def candidates(self) -> int:
        return self.window_start - self.sink_end

    @property
    def dense(self) -> bool:
        """True when the budget covers every chunk: the step is exact attention."""
        return self.picks >= self.candidates

    open_tokens: int

    @property
    def attended_tokens(self) -> int:
        """Tokens one KV head attends this step (the new one included)."""
        fixed = self.sink_end + self.sealed - self.window_start + min(self.picks, self.candidates)
        return fixed * self.chunk_size + self.open_tokens


def plan_selection(total: int, chunk_size: int, sink_tokens: int, window_tokens: int,
                   budget_tokens: int) -> SelectionPlan:
    """Plan a step over `total` tokens (the new one included) under `budget_tokens` (sinks, window and the
    open chunk's tokens included). Pure arithmetic."""
    c = chunk_size
    sealed = total // c
    sink_end = min(-(-sink_tokens // c), sealed)
    window_start = max(sink_end, sealed - (-(-window_tokens // c)))
    fixed = (sink_end + sealed - window_start) * c + total - sealed * c  # tokens always attended
    picks = max(0, (budget_tokens - fixed) // c)
    return SelectionPlan(sealed, sink_end, window_start, picks, c, total - sealed * c)


class DeviceStepPlan(NamedTuple):
    """`plan_selection` on device tensors, for a step captured in a CUDA graph (no host sync), with the step's fixed
    entries: sinks | window | open chunk. Shared by every layer of one step (and by the pick prediction)."""

    total: torch.Tensor  # (1,) tokens, the new one included
    sealed: torch.Tensor  # (1,)
    window_start: torch.Tensor  # (1,)
    picks: torch.Tensor  # (1,) chunks picked per KV head, at most the candidates
    fixed_ids: torch.Tensor  # (F,) chunk ids of the fixed entries
    fixed_len: torch.Tensor  # (F,) their valid tokens


def plan_on_device(total: torch.Tensor, chunk_size: int, sink_chunks: int, window_chunks: int,
                   token_budget: int | float, floor_tokens: int) -> DeviceStepPlan:
    """`plan_selection`'s arithmetic on a (1,) device tensor `total`; token_budget and floor_tokens as TierConfig's
    token_budget and budget_floor_tokens (a float is a fraction of the context, attending at least floor_tokens):
    the budget is TierConfig.budget_tokens(total)."""
    c, device = chunk_size, total.device
    sealed = torch.div(total, c, rounding_mode="floor")
    sink_end = torch.clamp(sealed, max=sink_chunks)
    window_start = torch.maximum(sink_end, sealed - window_chunks)
    tb = token_budget
    if isinstance(tb, float):
        budget = (total.double() * tb).floor().long().clamp_min(max(1, floor_tokens))
    else:
        budget = torch.full_like(total, tb)
    fixed = (sink_end + sealed - window_start) * c + total - sealed * c
    picks = torch.clamp(torch.div(budget - fixed, c, rounding_mode="floor"), min=0)
    picks = torch.minimum(picks, window_start - sink_end)
    sink_ids = torch.arange(sink_chunks, device=device)
    win_ids = window_start + torch.arange(window_chunks, device=device)
    fixed_ids = torch.cat([sink_ids, win_ids, sealed])
    fixed_len = torch.cat([torch.where(sink_ids < sink_end, c, 0), torch.where(win_ids < sealed, c, 0),
                           total - sealed * c])
    return DeviceStepPlan(total, sealed, window_start, picks, fixed_ids, fixed_len)


def plan_step(total: int, config: TierConfig) -> SelectionPlan:
    """The plan of a decode step over `total` tokens (the new one included) under config's chunk size, sinks,
    window and token budget: the one rule of both sparse caches."""
    return plan_selection(total, config.chunk_size, config.sink_tokens, config.window_tokens,
                          config.budget_tokens(total))


def merge_picks(top: torch.Tensor, plan: SelectionPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of sealed chunks to fetch and which KV head attends which.

    top: (Hkv, k) picked chunk ids in [sink_end, window_start). Returns ids (n,) int64 sorted and keep (Hkv, n)
    bool: sinks and window for every head, a picked chunk for the heads that picked it. No host sync.
    """
    dev = top.device
    fixed = torch.cat([torch.arange(plan.sink_end, device=dev),
                       torch.arange(plan.window_start, plan.sealed, device=dev)])
    ids = torch.unique(torch.cat([fixed, top.flatten()]))  # (n,) sorted
    picked = (ids.view(1, -1, 1) == top.unsqueeze(1)).any(-1)  # (Hkv, n)
    always = (ids < plan.sink_end) | (ids >= plan.window_start)  # (n,)
    return ids, picked | always.unsqueeze(0)


def all_chunks(plan: SelectionPlan, num_kv_heads: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sealed chunk for every head (a dense step), in `merge_picks`' format."""
    ids = torch.arange(plan.sealed, device=device)
    return ids, torch.ones((num_kv_heads, plan.sealed), dtype=torch.bool, device=device)
