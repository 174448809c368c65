"""How well layer i+1's picks can be predicted while layer i still computes: the query of layer i+1 made from
the residual after layer i's attention (layer i+1's norm, q projection and RoPE; InfiniGen's idea), scored with
layer i+1's own index. Reports, per decode step and layer, the share of layer i+1's attended picks that the
prediction's top picks contain, against the share that layer i+1's picks of the previous step contain (what
"last step's picks" as a prediction gives).

    python bench/pick_prediction.py --model smollm2 --context 6144 --steps 16         (CPU, real text)
    python bench/pick_prediction.py --model llama3.1-8b --context 32768 --steps 16    (CUDA, random weights)
The 8B shape prefills random token ids through the random model (keys as the benchmark has them).
Ends with one JSON line (device, date, command).
"""

from __future__ import annotations

import argparse

import torch

import tierkv.kv.caches.sparse as sparse_cache
from tierkv.bench.common import emit, run_record
from tierkv.config import TierConfig
from tierkv.engine import prefill


class PredictionRecorder(sparse_cache.SparseKVCache):
    """The graph cache, taking the query the model predicts for layer i+1 after layer i's attention (the pick
    prefetch hook, kv/interface.PickPrefetchHooks) and noting that query's chunk ranking instead of prefetching."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.attended: list = []  # this step's attended picks per layer so far (a set of chunk ids per head)
        self.predicted: dict = {}  # layer -> the predicted query's ranking (Hkv, K), this step

    @property
    def prefetches_picks(self) -> bool:
        return True

    def predicted_query(self, layer: int, make_q) -> None:
        if self.fitted and len(self.attended) == layer:  # every earlier layer attended sparsely in this step
            self.predicted[layer] = self.rank_chunks(layer, make_q())[0]


def decode_recording(model, cache: PredictionRecorder, token: torch.Tensor, steps: int) -> list[list[tuple]]:
    """Greedy eager decode; per sparse step and layer (actual attended picks as a set per head, predicted top)."""
    entries = sparse_cache.sparse_entries

    def recording(top, score, n_picks, *rest, **kw):  # the cache's own entry builder, noting attended picks
        out = entries(top, score, n_picks, *rest, **kw)
        picked = out[1][:, -top.shape[1]:] > 0
        cache.attended.append([set(top[h][picked[h]].tolist()) for h in range(top.shape[0])])
        return out

    sparse_cache.sparse_entries = recording
    model.rope.ensure(cache.capacity + 1)  # (what the engine's decode step does for the positions it reaches)
    layers, runs = model.cfg.num_layers, []
    try:
        for _ in range(steps):
            cache.attended.clear()
            cache.predicted.clear()
            token = model.forward(token, cache.pos.clone(), cache).argmax(-1)
            actual, preds = cache.attended, cache.predicted
            if len(actual) == layers and len(preds) == layers - 1:  # sparse, fitted before it began
                runs.append([(actual[i], preds.get(i)) for i in range(layers)])
    finally:
        sparse_cache.sparse_entries = entries
    return runs


def shares(runs) -> dict:
    """Share of attended picks (layers 1..L-1) found in the predicted top, and in the layer's previous-step picks."""
    hit_pred = hit_prev = n = 0
    for s, step in enumerate(runs):
        for layer in range(1, len(step)):
            picks, pred = step[layer]
            for h, want in enumerate(picks):
                n += len(want)
                k = len(want)
                hit_pred += len(want & set(pred[h][:max(k, 1)].tolist()))
                if s > 0:
                    hit_prev += len(want & runs[s - 1][layer][0][h])
    prev_n = n - sum(len(w) for layer in runs[0][1:] for w in layer[0]) if runs else 0
    return {"picks": n, "predicted_share": hit_pred / n if n else None,
            "last_step_share": hit_prev / prev_n if prev_n else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2 (real text, CPU) or a shape name (random, CUDA)")
    ap.add_argument("--context", type=int, default=6144)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--token-budget", type=int, default=None, help="default: 1/8 of the context")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    budget = args.token_budget or args.context // 8
    tier = TierConfig(attention="sparse", token_budget=budget)
    if args.model == "smollm2":
        import tierkv
        from pydoc_data.topics import topics

        llm = tierkv.load(device="cpu", dtype="fp32")
        model = llm.model
        text = "\n\n".join(topics[k] for k in sorted(topics))
        ids = llm.tokenizer(text, add_special_tokens=False)["input_ids"][:args.context]
    else:
        from tierkv.bench.systems import random_ids
        from tierkv.models.build import random_model
        from tierkv.models.shapes import shape_config

        model = random_model(shape_config(args.model), torch.device("cuda"), torch.bfloat16)
        ids = random_ids(args.context, model.cfg.vocab_size, 0)
    c = model.cfg
    cache = PredictionRecorder(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                               config=tier, capacity=len(ids) + args.steps + 1, rope=model.rope)
    with torch.no_grad():
        logits = prefill(model, torch.tensor(ids, device=model.device), cache, tier.prefill_chunk)
        runs = decode_recording(model, cache, logits[-1:].argmax(-1), args.steps)
    cache.close()
    out = {"bench": "pick_prediction", "model": args.model, "context": len(ids), "steps": args.steps,
           "sparse_steps": len(runs), "token_budget": budget, **shares(runs), **run_record(model.device)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
