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
import math

import torch

import tierkv.kv.caches.sparse as sparse_kv
from tierkv.bench.common import emit, run_record
from tierkv.config import TierConfig
from tierkv.engine import prefill
from tierkv.kernels import chunk_topk


def predicted_top(model, cache, layer: int, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Layer `layer`'s chunk ranking (Hkv, K) for a query made from residual h (1, hidden). Does not mutate."""
    c, w = model.cfg, model.layers[layer]
    _, x = model._norm(h, None, w.input_norm, c.rms_norm_eps)
    q, _, _ = model._rope(torch.nn.functional.linear(x, w.qkv_proj, w.qkv_bias), model.rope.cos, model.rope.sin,
                          positions, c.num_heads, c.num_kv_heads)
    total, _, window_start, _, _, _ = cache.step_plan
    ix = cache.index[layer]
    top, _ = chunk_topk(ix.project_query(q[0]), ix.coeffs, total, window_start, cache.max_picks, cache.chunk,
                        1.0 / math.sqrt(cache.d), cache.sink_chunks, cache.sp.reduce, row_scale=ix.row_scale)
    return top


def decode_recording(model, cache, token: torch.Tensor, steps: int) -> list[list[tuple]]:
    """Greedy eager decode; per step and layer (actual attended picks as a set per head, predicted top)."""
    actual: list = []
    entries = sparse_kv.sparse_entries

    def recording(top, score, n_picks, *rest, **kw):  # the cache's own entry builder, noting attended picks
        out = entries(top, score, n_picks, *rest, **kw)
        picked = out[1][:, -top.shape[1]:] > 0
        actual.append([set(top[h][picked[h]].tolist()) for h in range(top.shape[0])])
        return out

    sparse_kv.sparse_entries = recording
    model.rope.ensure(cache.capacity + 1)  # (what the engine's decode step does for the positions it reaches)
    c, runs = model.cfg, []
    try:
        for _ in range(steps):
            actual.clear()
            preds = {}
            positions = cache.pos.clone()
            h, x = model._norm(model.embed_tokens[token], None, model.layers[0].input_norm, c.rms_norm_eps)
            for i, layer in enumerate(model.layers):
                h, x = model._norm(h, model._attention(i, layer, x, positions, cache), layer.pre_mlp_norm,
                                   c.rms_norm_eps)
                if i + 1 < c.num_layers and cache.fitted:
                    preds[i + 1] = predicted_top(model, cache, i + 1, h, positions)
                nxt = model.layers[i + 1].input_norm if i + 1 < c.num_layers else model.norm
                h, x = model._norm(h, model._mlp(layer, x), nxt, c.rms_norm_eps)
            cache.advance(1)
            token = torch.nn.functional.linear(x, model.lm_head).argmax(-1)
            if len(actual) == c.num_layers and len(preds) == c.num_layers - 1:  # sparse, fitted before it began
                runs.append([(actual[i], preds.get(i)) for i in range(c.num_layers)])
    finally:
        sparse_kv.sparse_entries = entries
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
    cache = sparse_kv.SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device,
                                    dtype=model.dtype, config=tier, capacity=len(ids) + args.steps + 1,
                                    rope=model.rope)
    with torch.no_grad():
        logits = prefill(model, torch.tensor(ids, device=model.device), cache, tier.prefill_chunk)
        runs = decode_recording(model, cache, logits[-1:].argmax(-1), args.steps)
    cache.close()
    out = {"bench": "pick_prediction", "model": args.model, "context": len(ids), "steps": args.steps,
           "sparse_steps": len(runs), "token_budget": budget, **shares(runs), **run_record(model.device)}
    emit(out, args.out)


if __name__ == "__main__":
    main()
