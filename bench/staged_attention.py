"""One layer's prefill attention when its K/V are all on the device (layer-major prefill): the span path the
sparse cache ran first (fused spans of EXACT_SPAN keys merged by log-sum-exp), one span for all earlier keys (what
it runs on CUDA now), one SDPA call per slice
(grouped-query heads, bottom-right causal mask) and one call for the whole layer.

Usage (H200/H100): python bench/staged_attention.py --context 131072 --out $OUT/staged_attention.json
Ends with one JSON line (device, date, command, ms per layer and TFLOP/s of each variant, max difference).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from tierkv.kv.caches.sparse import EXACT_SPAN
from tierkv.kernels.online_softmax import OnlineSoftmax
from tierkv.kernels.causal_attention import causal_attention


def spans(q, k, v, slice_len, span=EXACT_SPAN):
    outs = []
    for s in range(0, q.shape[0], slice_len):
        e = min(q.shape[0], s + slice_len)
        qs = q[s:e]
        if e <= EXACT_SPAN:
            outs.append(causal_attention(qs, k[:e], v[:e]))
            continue
        acc = OnlineSoftmax(qs, k.shape[1])
        for a in range(0, s, span):
            acc.add_span(k[a:min(s, a + span)], v[a:min(s, a + span)])
        acc.add_span(k[s:e], v[s:e], causal=True)
        outs.append(acc.result())
    return torch.cat(outs)


def one_prefix_span(q, k, v, slice_len):
    return spans(q, k, v, slice_len, span=q.shape[0])


def per_slice_gqa(q, k, v, slice_len):
    outs = []
    for s in range(0, q.shape[0], slice_len):
        e = min(q.shape[0], s + slice_len)
        q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q[s:e], k[:e], v[:e]))
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=causal_lower_right(e - s, e), enable_gqa=True)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs)


def whole_gqa(q, k, v, slice_len):
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    return F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, enable_gqa=True)[0].transpose(0, 1)


def timed(fn, *args):
    fn(*args)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn(*args)
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--slice", type=int, default=2048)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    n, hq, hkv, d = args.context, 32, 8, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(n, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for h in (hq, hkv, hkv))
    flops = 4 * (n * n / 2) * hq * d
    ref, res = None, {}
    for name, fn in (("spans", spans), ("one_prefix_span", one_prefix_span), ("per_slice_gqa", per_slice_gqa),
                     ("whole_gqa", whole_gqa)):
        try:
            out, sec = timed(fn, q, k, v, args.slice)
        except RuntimeError as e:
            res[name] = {"error": str(e).splitlines()[0][:200]}
            continue
        ref = out if ref is None else ref
        res[name] = {"ms_per_layer": round(sec * 1e3, 1), "tflops": round(flops / sec / 1e12, 1),
                     "max_abs_diff_vs_spans": float((out.float() - ref.float()).abs().max())}
        print(name, res[name], flush=True)
    doc = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv),
           "context": n, "slice": args.slice, "heads": [hq, hkv, d], "variants": res}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
