"""The selection oracle for fidelity benches: what sparse decode would give if it picked the best chunks exactly.

Each decode step of a full-attention layer attends the same sinks, window and open chunk as the shipped selection
(kv/select.plan_selection, the same budget per step), and, per KV head, the chunks in between that hold the most
true attention mass (exact scores over every key, softmax-normalised, summed over the head's query group), with
exact keys and values. Sliding-window layers attend their window exactly, as in full attention. Prefill is exact.
"""

from __future__ import annotations

import torch

from tierkv.config import TierConfig
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.sparse.select import SelectionPlan, plan_selection


class OracleKVCache(DenseKVCache):
    """All-on-device cache whose full-attention decode steps attend the oracle's chunks (module docstring)."""

    kind = "oracle"

    def __init__(self, *shape: int, tier: TierConfig, **kw) -> None:
        super().__init__(*shape, **kw)
        self.tier = tier
        globals_ = [i for i, w in enumerate(self.windows) if w is None]
        self._counted = globals_[0] if globals_ else -1  # the layer whose steps are counted (once per step)
        self.steps = {"sparse_steps": 0, "dense_steps": 0}

    def plan(self, total: int) -> SelectionPlan:
        """The shipped selection's plan of a step over `total` tokens (the new one included)."""
        t = self.tier
        return plan_selection(total, t.chunk_size, t.sink_tokens, t.window_tokens, t.budget_tokens(total))

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1 or self.windows[layer] is not None:
            return super().attend(layer, q)
        total = self.seq_len + 1
        plan = self.plan(total)
        if layer == self._counted:
            self.steps["dense_steps" if plan.dense else "sparse_steps"] += 1
        if plan.dense:  # the budget covers every chunk: exact attention, as the shipped cache does
            return super().attend(layer, q)
        k, v = self.k[layer, :total].float(), self.v[layer, :total].float()  # (n, Hkv, D)
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        # q arrives scaled so that D**-0.5 is the score scale (the model folds its own scale into q, as for SDPA)
        s = torch.einsum("hgd,nhd->hgn", q[0].float().reshape(hkv, hq // hkv, d), k) * d ** -0.5  # (Hkv, G, n)
        keep = oracle_keep(torch.softmax(s, dim=-1).sum(1), plan)  # (Hkv, n)
        p = torch.softmax(s.masked_fill(~keep[:, None, :], float("-inf")), dim=-1)
        return torch.einsum("hgn,nhd->hgd", p, v).reshape(1, hq, d).to(q.dtype)

    def stats(self) -> dict:
        return {**super().stats(), **self.steps}

    def reset_stats(self) -> None:
        self.steps = dict.fromkeys(self.steps, 0)


def oracle_keep(mass: torch.Tensor, plan: SelectionPlan) -> torch.Tensor:
    """(Hkv, n) bool over the n = total tokens of a step: the sinks, the window and open chunk, and per KV head the
    `plan.picks` whole chunks in between with the largest summed `mass` (Hkv, n)."""
    c = plan.chunk_size
    lo, hi = plan.sink_end * c, plan.window_start * c
    keep = torch.zeros_like(mass, dtype=torch.bool)
    keep[:, :lo] = True
    keep[:, hi:] = True
    picks = min(plan.picks, plan.candidates)
    if picks:
        per_chunk = mass[:, lo:hi].reshape(mass.shape[0], plan.candidates, c).sum(-1)  # (Hkv, candidates)
        top = per_chunk.topk(picks, dim=-1).indices  # (Hkv, picks)
        rows = (lo + top[..., None] * c + torch.arange(c, device=mass.device)).flatten(1)  # their token positions
        keep.scatter_(1, rows, True)
    return keep
