"""Issue 3 GPU record: parity with transformers on CUDA (fp32, bf16) and decode ms/token, all on the GPU.

Models: SmolLM2-135M (real weights) and a random-weight Llama-3.1-8B shape; ours with a CUDA graph, ours
eager, and transformers' eager decode on the same weights. Prints a table; writes JSON to --out.
Usage: python bench/dense_decode.py --context 4096 --steps 64 --out results.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time

import torch

import tierkv
from tierkv.engine import eager_step, prefill
from tierkv.graph import GraphStep
from tierkv.kv.caches.static import StaticKVCache
from tierkv.models.build import build_model
from tierkv.models.config import ModelConfig
from tierkv.models.shapes import shape_config


def _ours(model, ids: torch.Tensor, steps: int, graph: bool) -> float:
    c = model.cfg
    cache = StaticKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device="cuda", dtype=model.dtype,
                          capacity=ids.shape[0] + steps + 1)
    with torch.no_grad():
        logits = prefill(model, ids, cache, 2048)
        step = GraphStep(model, cache) if graph else eager_step(model, cache)
        token = logits[-1].argmax().view(1)
        times = []
        for i in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = step(token, ids.shape[0] + i)
            token = logits[-1].argmax().view(1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    cache.close()
    return 1000 * statistics.median(times[4:])


def _hf(hf_model, ids: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        out = hf_model(ids[None], use_cache=True)
        past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
        times = []
        for _ in range(steps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf_model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[0, -1].argmax().view(1, 1)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[4:])


def _hf_random(cfg: ModelConfig, dtype: torch.dtype):
    import transformers as tf

    hf_cfg = tf.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
                            max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
                            rope_parameters={"rope_theta": cfg.rope_theta, **cfg.rope_scaling},
                            tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(hf_cfg).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() == 2 else p.fill_(1.0)
    return model, hf_cfg


def parity(folder: str, ids: list[int]) -> list[dict]:
    from transformers import AutoModelForCausalLM

    rows = []
    for dtype in ("fp32", "bf16"):
        llm = tierkv.load(folder, device="cuda", dtype=dtype)
        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=llm.dtype).cuda().eval()
        x = torch.tensor(ids, device="cuda")
        with torch.no_grad():
            ref = hf(x[None]).logits[0].float()
            cache = llm.new_cache(len(ids))
            ours = prefill(llm.model, x, cache, 4096, all_logits=True)
        rows.append({"model": "SmolLM2-135M", "dtype": dtype, "tokens": len(ids),
                     "max_abs_diff": (ours - ref).abs().max().item(),
                     "top1_agreement": (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()})
        del hf, llm
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--out", default=None)
    ap.add_argument("--parts", default="smol,8b", help="comma list of: smol, 8b")
    args = ap.parse_args()
    from pydoc_data.topics import topics

    from tierkv.models.weights import default_model_path, resolve_model

    parts = args.parts.split(",")
    results = {"device": torch.cuda.get_device_name(0), "date": datetime.date.today().isoformat(),
               "command": " ".join([sys.executable.split("/")[-1], *sys.argv]), "torch": torch.__version__}
    decode, results["parity"] = [], []
    if "smol" in parts:
        folder = str(resolve_model(default_model_path()))
        smol = tierkv.load(folder, device="cuda", dtype="bf16")
        text_ids = smol.tokenizer("\n\n".join(topics.values()), add_special_tokens=False)["input_ids"]
        results["parity"] = parity(folder, text_ids[:300])
        ids = torch.tensor(text_ids[:args.context], device="cuda")
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
        decode.append({"model": "SmolLM2-135M", "context": args.context,
                       "tierkv_graph_ms": _ours(smol.model, ids, args.steps, True),
                       "tierkv_eager_ms": _ours(smol.model, ids, args.steps, False),
                       "transformers_ms": _hf(hf, ids, args.steps)})
        del hf, smol
    if "8b" in parts:
        decode.append(_eight_b(args))
    results["decode"] = decode
    _report(results, args.out)


def _eight_b(args) -> dict:
    cfg = shape_config("llama3.1-8b")
    hf, _ = _hf_random(cfg, torch.bfloat16)
    sd = dict(hf.state_dict())
    ours = build_model(cfg, sd.__getitem__)
    rnd = torch.randint(0, cfg.vocab_size, (args.context,), device="cuda")
    hf_ms = _hf(hf, rnd, args.steps)
    del hf, sd  # our fused copies stay
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    g = _ours(ours, rnd, args.steps, True)
    peak = torch.cuda.max_memory_allocated()
    return {"model": "llama3.1-8b (random bf16)", "context": args.context, "tierkv_graph_ms": g,
            "tierkv_eager_ms": _ours(ours, rnd, args.steps, False), "transformers_ms": hf_ms,
            "tierkv_peak_gib": peak / 2**30,
            "weight_floor_ms_at_2.5TBps": 1000 * sum(t.numel() * 2 for t in _tensors(ours)) / 2.5e12}


def _report(results: dict, out: str | None) -> None:
    for r in results["parity"]:
        print(f"parity {r['dtype']}: max|diff| {r['max_abs_diff']:.2e} top1 {r['top1_agreement']:.4f}")
    for r in results["decode"]:
        print(f"{r['model']:28s} ctx {r['context']}: graph {r['tierkv_graph_ms']:.2f} ms  eager {r['tierkv_eager_ms']:.2f} ms"
              f"  transformers {r['transformers_ms']:.2f} ms")
    line = json.dumps(results)
    if out:
        open(out, "w").write(line + "\n")
    print(line)


def _tensors(model):
    yield model.embed_tokens if model.lm_head is not model.embed_tokens else model.lm_head
    for layer in model.layers:
        for t in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            yield t


if __name__ == "__main__":
    main()
