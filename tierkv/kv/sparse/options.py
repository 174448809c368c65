"""What both sparse caches take beside TierConfig: sparse-mode knobs that are not user budgets, and the RoPE tables
they need of the model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


class RopeTables(Protocol):
    """What the cache needs of the model's RoPE (tierkv.models.rope.Rope fits): cos/sin (S, D) tables."""

    cos: torch.Tensor
    sin: torch.Tensor

    def ensure(self, length: int) -> None: ...


@dataclass(frozen=True)
class SparseOptions:
    """Sparse-mode knobs that are not user budgets (TierConfig holds rank, token_budget, chunk/sink/window).

    scorer: 'lowrank' (post-RoPE keys projected per KV head; measured best), 'lowrank-shared', 'mean', 'minmax'.
    score_rank: rank of the score index per KV head (None: TierConfig.score_rank). fold_tokens: decode keys stay exact
    until this many sealed tokens beyond the shadow accumulate, then they are projected onto the shadow's basis.
    outlier_threshold: relative key error (Frobenius, per chunk) above which a chunk keeps exact keys.
    rebuild: False attends picked chunks with exact keys (isolates selection error; for measurements).
    reduce: how a chunk's per-query-head scores become one per KV head (kernels.chunk_topk: 'group-mass',
    'mass', 'max').
    """

    scorer: str = "lowrank"
    score_rank: int | None = None  # None: TierConfig.score_rank (a measurement may override it here)
    # chunk mass summed over the query group: 94.1% at 1/8 on SmolLM2 against 93.4% for the max over the group
    reduce: str = "group-mass"
    fold_tokens: int = 512
    outlier_threshold: float = 0.5
    rebuild: bool = True
    promote: bool = True
