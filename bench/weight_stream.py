"""Weight streaming against the plan's bound: layers of a shape's size, some resident and some streamed through
tierkv.weights.stream.WeightStreamer, each "layer" a GEMV over its weights; ms/token against
max(streamed bytes / link, all GPU-read bytes / HBM) with rates measured here.

GPU run (8B shape, 16 of 32 layers streamed, then 10, 2 slots):
    python bench/weight_stream.py --shape llama3.1-8b --streamed 16,10 --slots 2 --out bench/results/weight_stream.json
CPU smoke run: python bench/weight_stream.py --shape llama-tiny --streamed 1 --tokens 3 --out /tmp/ws.json
Ends with one JSON line (device, date, command and the numbers); the same JSON goes to --out.
"""

from __future__ import annotations

import argparse
import time

import torch

from tierkv.bench.common import emit, run_record
from tierkv.bench.floor import measure_rates
from tierkv.models.shapes import shape_config
from tierkv.plan import spread
from tierkv.plan.sizes import weight_sizes
from tierkv.weights.stream import WeightStreamer


def layer_tensors(d: int, rows: int, device, dtype) -> dict[str, torch.Tensor]:
    """One layer's bytes as one (rows, d) matrix: the GEMV reads every byte once, as decode does."""
    return {"w": torch.randn(rows, d, device=device).to(dtype)}


def run(shape: str, streamed: int, slots: int, tokens: int, device: torch.device) -> dict:
    cfg, dtype = shape_config(shape), torch.bfloat16 if device.type == "cuda" else torch.float32
    e = torch.empty((), dtype=dtype).element_size()
    size = weight_sizes(cfg, e).layer[0]
    rows = size // (cfg.hidden_size * e)
    n = cfg.num_layers
    where = set(spread(n, streamed))
    resident = {i: layer_tensors(cfg.hidden_size, rows, device, dtype) for i in range(n) if i not in where}
    st = WeightStreamer({i: layer_tensors(cfg.hidden_size, rows, "cpu", dtype) for i in sorted(where)}, device,
                        slots=slots)
    x = torch.randn(cfg.hidden_size, 1, device=device).to(dtype)

    def token() -> None:
        for i in range(n):
            w = st.fetch(i)["w"] if i in where else resident[i]["w"]
            w @ x
            if i in where:
                st.release(i)

    token()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(tokens):
        token()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    ms = 1e3 * (time.perf_counter() - t0) / tokens
    rates = measure_rates(device, dtype, None)  # pinned copy and GEMV probes (host memcpy on the CPU)
    link, hbm = rates.h2d, rates.hbm
    bound = 1e3 * max(streamed * rows * cfg.hidden_size * e / link, n * rows * cfg.hidden_size * e / hbm)
    return {"shape": shape, "streamed": streamed, "layers": n, "slots": slots, "layer_bytes": rows * cfg.hidden_size * e,
            "ms_per_token": ms, "bound_ms": bound, "ratio": ms / bound, "link_gbps": link / 1e9, "hbm_gbps": hbm / 1e9,
            "streamer": st.stats()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--streamed", default="16,10", help="Comma list: how many layers stream, one run each.")
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    device = torch.device(a.device)
    rows = [run(a.shape, int(k), a.slots, a.tokens, device) for k in a.streamed.split(",")]
    for r in rows:
        print(f"{r['streamed']}/{r['layers']} streamed: {r['ms_per_token']:.2f} ms/token, bound {r['bound_ms']:.2f} "
              f"({r['ratio']:.3f}x), mode {r['streamer']['mode']}")
    emit({"kind": "weight_stream", "rows": rows, **run_record(device)}, a.out)


if __name__ == "__main__":
    main()
