"""Sparse-attention fidelity against full attention, for the benches (bench/long_fidelity.py, bench/passkey.py).

A context is prefilled exactly once (`PrefillSnapshot`: every layer's K, V and pre-RoPE keys and the last logits)
and replayed into a fresh cache per method, so each method and budget costs only its decode steps. Prefill is
exact in every cache, so replaying the recorded K/V leaves a cache as its own prefill would (slice by slice, as
`engine.prefill` appends them). Methods:
- full: the factory's cache under full attention (what `LLM.score` uses);
- sparse: the factory's cache under attention="sparse" at the budget (the shipped selection);
- oracle: `OracleKVCache` at the same budget, sinks and window (the best chunks by true attention mass).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from tierkv.bench.oracle_cache import OracleKVCache
from tierkv.config import TierConfig
from tierkv.engine import GenStats, eager_step, generate_ids, prefill
from tierkv.errors import ConfigError
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.base import KVCache

METHODS = ("full", "sparse", "oracle")


class _Recorder(DenseKVCache):
    """A dense cache that also keeps the pre-RoPE keys of every append, so its prefill can be replayed."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.k_pre: list[list[torch.Tensor]] = [[] for _ in range(self.num_layers)]

    def append(self, layer, k, v, k_pre=None) -> None:
        super().append(layer, k, v, k_pre)
        self.k_pre[layer].append(k_pre.clone())


class PrefillSnapshot:
    """The exact prefill of `ids` (T,) on the LLM's device: K, V, pre-RoPE keys (L, T, Hkv, D) and the logits
    of the last token (1, V)."""

    @torch.no_grad()
    def __init__(self, llm, ids: torch.Tensor) -> None:
        c = llm.cfg
        t0 = time.perf_counter()
        rec = _Recorder(c.num_layers, c.num_kv_heads, c.head_dim, device=llm.device, dtype=llm.dtype,
                        capacity=ids.shape[0], windows=c.layer_windows)
        self.first = prefill(llm.model, ids, rec, llm.tier.prefill_chunk)[-1:]
        self.n, self.slice = ids.shape[0], llm.tier.prefill_chunk
        self.k, self.v = rec.k, rec.v
        self.k_pre = torch.stack([torch.cat(parts) for parts in rec.k_pre])
        self.seconds = time.perf_counter() - t0

    def replay(self, cache: KVCache) -> None:
        """Append the snapshot to an empty cache in prefill slices (every layer, then advance), as a prefill
        would. Mutates cache."""
        for s in range(0, self.n, self.slice):
            e = min(self.n, s + self.slice)
            for layer in range(self.k.shape[0]):
                cache.append(layer, self.k[layer, s:e], self.v[layer, s:e], self.k_pre[layer, s:e])
            cache.advance(e - s)

    def close(self) -> None:
        self.k = self.v = self.k_pre = torch.empty(0)


def method_cache(llm, method: str, tier: TierConfig, capacity: int) -> KVCache:
    """A fresh cache for `method` (METHODS) holding `capacity` positions, under tier's budget, sinks and window.
    Raises ConfigError where the factory refuses the method for this model."""
    if method == "full":
        return llm.new_cache(capacity, use="score", tier=tier.replace(attention="full"))
    if method == "sparse":
        return llm.new_cache(capacity, use="score", tier=tier.replace(attention="sparse"))
    if method == "oracle":
        c = llm.cfg
        return OracleKVCache(c.num_layers, c.num_kv_heads, c.head_dim, tier=tier, device=llm.device,
                             dtype=llm.dtype, capacity=capacity, windows=c.layer_windows)
    raise ConfigError(f"method {method!r} is unknown; use one of {', '.join(METHODS)}")


def release(llm, cache: KVCache) -> None:
    """Close a method_cache cache (factory caches through the LLM, which registered them)."""
    if isinstance(cache, OracleKVCache):
        cache.close()
    else:
        llm.end_call(cache)


@torch.no_grad()
def teacher_forced(llm, cache: KVCache, ids: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Log-probs (len(ids) - S, V), float32 on the CPU, of tokens S.. of ids (S = cache.seq_len, the replayed
    prefix): row 0 from `first` (the prefill's last logits), the others through the decode path, teacher-forced."""
    step = eager_step(llm.model, cache)
    rows = [first[-1]] + [step(ids[p:p + 1], p)[-1] for p in range(cache.seq_len, ids.shape[0] - 1)]
    return torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()


@torch.no_grad()
def greedy(llm, cache: KVCache, first: torch.Tensor, max_new: int) -> list[int]:
    """Up to max_new greedy token ids after the replayed prefix (stops after a stop id)."""
    step = eager_step(llm.model, cache)
    return list(generate_ids(step, first, cache.seq_len, max_new, llm.stop_ids, GenStats()))


def compare(lp: torch.Tensor, ref: torch.Tensor, targets: torch.Tensor) -> dict:
    """Top-1 agreement of lp with ref, mean NLL of targets under each, its relative change (nll_delta) and its
    change in nats per token (nll_diff: on text the model nearly knows, a small NLL makes the relative change
    swing). Rows aligned."""
    nll, nll_ref = -lp.gather(1, targets[:, None]).mean(), -ref.gather(1, targets[:, None]).mean()
    return {"agreement": (lp.argmax(-1) == ref.argmax(-1)).float().mean().item(), "nll": nll.item(),
            "nll_full": nll_ref.item(), "nll_delta": (nll / nll_ref - 1).item(), "nll_diff": (nll - nll_ref).item()}


def parse_budget(text: str) -> int | float:
    """'2048' -> 2048 tokens; '1/16' or '0.0625' -> the fraction 0.0625 of the context."""
    try:
        if "/" in text:
            num, den = text.split("/")
            return int(num) / int(den)
        return float(text) if "." in text else int(text)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"budget {text!r} is not a token count or a fraction; use e.g. 2048 or 1/16") from None


def context_rows(llm, ids: Sequence[int], n: int, budgets: Sequence[str], methods: Sequence[str] = ("sparse", "oracle"),
                 log=None, variants: Sequence[dict] = ({},)) -> list[dict]:
    """Score tokens n.. of ids (teacher-forced) with full attention, then with each method at each budget (labels
    parse_budget reads) and each variant (TierConfig fields over the LLM's, e.g. {"rank": 160}), all from one
    prefill of ids[:n]. Returns the full row (its mean NLL) and one row per (budget, variant, method) with
    compare()'s fields; a method the factory refuses gets its error instead. A fraction label is the fraction alone
    (budget_floor_tokens 0 unless a variant sets it), so each row measures the budget its label names."""
    x = torch.tensor(list(ids), dtype=torch.long, device=llm.device)
    targets = x[n:].cpu()
    snap = PrefillSnapshot(llm, x[:n])
    ref, _, seconds = _scores(llm, snap, x, "full", llm.tier)
    rows = [{"context": n, "method": "full", "positions": len(targets), "nll": compare(ref, ref, targets)["nll"],
             "prefill_s": round(snap.seconds, 1), "seconds": round(seconds, 1)}]
    for label, variant in ((b, v) for b in budgets for v in variants):
        tier = llm.tier.replace(token_budget=parse_budget(label), **{"budget_floor_tokens": 0, **variant})
        base = {"context": n, "budget": label, "token_budget": tier.token_budget,
                "budget_floor_tokens": tier.budget_floor_tokens, "budget_tokens": tier.budget_tokens(n)}
        if variant:
            base["variant"] = dict(variant)
        for method in methods:
            try:
                lp, st, seconds = _scores(llm, snap, x, method, tier)
            except ConfigError as exc:  # e.g. the sparse cache refusing a sliding-window model: recorded
                rows.append({**base, "method": method, "error": str(exc)})
            else:
                steps = {k: st[k] for k in ("cache", "sparse_steps", "dense_steps", "outlier_chunks") if k in st}
                rows.append({**base, "method": method, **compare(lp, ref, targets), "kv": steps,
                             "seconds": round(seconds, 1)})
            if log:
                log(rows[-1])
    snap.close()
    return rows


def _scores(llm, snap: PrefillSnapshot, x: torch.Tensor, method: str,
            tier: TierConfig) -> tuple[torch.Tensor, dict, float]:
    """Teacher-forced log-probs of x[snap.n:] through a fresh `method` cache replayed from snap, the cache's
    stats and the seconds it took."""
    t0 = time.perf_counter()
    cache = method_cache(llm, method, tier, x.shape[0] + 1)
    try:
        snap.replay(cache)
        lp = teacher_forced(llm, cache, x, snap.first)
        stats = cache.stats()
    finally:
        release(llm, cache)
    return lp, stats, time.perf_counter() - t0
