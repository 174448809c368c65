"""What the key-shadow and index fits' eigensolver calls cost per layer (8B shape: a 1024x1024 Gram for the
shadow, 8 Grams of 128x128 for the index), on the compute device and on the host, by precision and batching.

    python bench/eigh_speed.py --out r.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _gram(shape: tuple[int, ...], device: str) -> torch.Tensor:
    x = torch.randn(*shape[:-2], 4096, shape[-1], device=device, dtype=torch.float64)
    return x.transpose(-1, -2) @ x


def _ms(fn, device: str, reps: int = 5) -> float:
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return round(1000 * (time.perf_counter() - t0) / reps, 2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    res = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": " ".join(sys.argv),
           "cpu_threads": torch.get_num_threads()}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        big, small = _gram((1024, 1024), dev), _gram((8, 128, 128), dev)
        row = {}
        for name, dt in (("fp64", torch.float64), ("fp32", torch.float32)):
            b, s = big.to(dt), small.to(dt)
            row[f"shadow_1024_{name}_ms"] = _ms(lambda: torch.linalg.eigh(b), dev)
            row[f"index_8x128_batched_{name}_ms"] = _ms(lambda: torch.linalg.eigh(s), dev)
            row[f"index_8x128_one_by_one_{name}_ms"] = _ms(lambda: [torch.linalg.eigh(g) for g in s], dev)
        res[dev] = row
    if torch.cuda.is_available():
        res["device"] = torch.cuda.get_device_name()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
