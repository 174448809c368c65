"""Shared memory of the split-K decode kernels, compiled ahead of time for a GPU this machine need not have.

kernels/split_blocks picks keys per block from an estimate of the tiles Triton stages in shared memory (a
per-kernel factor x block x D x element bytes, plus the shadow kernel's basis slices). An estimate that is too low
fails at launch with Triton's OutOfResources (the shadow kernel then retries smaller); one too high costs speed.
This compiles each kernel at the block split_blocks picks for the target and checks the bytes Triton reports
against the target's limit. Needs Triton (with its NVIDIA backend) importable, no GPU; use the version the GPU
machine runs, since shared memory differs by version:

  pip install --target /tmp/triton36 triton==3.6.0
  PYTHONPATH=/tmp/triton36:$PWD python bench/kernel_shared_memory.py --out bench/results/....json
Exits 1 if a chosen block does not fit (the row then says what the shadow kernel's launch falls back to).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from datetime import date

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tierkv.kernels import decode_attention_triton as dense
from tierkv.kernels import shadow_attention_triton as shadow
from tierkv.kernels import split_blocks

GPU = torch.device("cuda", 0)  # a device split_blocks is told the limit of; nothing runs on it

# per-block shared memory a program may opt into (bytes), less the 1 KiB the driver keeps (split_blocks.py)
LIMITS = {"h100": (90, 232448), "rtx4090": (89, 101376)}
POINTER_DTYPES = {  # pointer arguments whose element type is not the pools' dtype
    "cos_ptr": "fp32", "sin_ptr": "fp32", "po_ptr": "fp32", "pl_ptr": "fp32",
    "slot_ptr": "i32", "len_ptr": "i32", "cid_ptr": "i32", "csrc_ptr": "i32",
}


def compiled_shared(kernel, constexprs: dict, ints: dict, dtype: str, arch: int) -> int:
    """Bytes of shared memory Triton gives `kernel` compiled for sm_`arch` with these constexprs, specialised as a
    launch would be: pointers 16-byte aligned, integer arguments from `ints` (typical values at this shape) as
    16-divisible or the constant 1 where they are, except the kernel's do_not_specialize ones. The alignment hints
    let Triton pipeline loads through shared memory, so they change the count."""
    free = {kernel.arg_names[i] if isinstance(i, int) else i for i in kernel.do_not_specialize}
    sig, attrs, cons = {}, {}, dict(constexprs)
    for i, name in enumerate(kernel.arg_names):
        if name in cons:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + POINTER_DTYPES.get(name, dtype)
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("scale"):
            sig[name] = "fp32"
        else:
            v = ints[name]
            if v == 1 and name not in free:
                cons[name], sig[name] = 1, "constexpr"
                continue
            sig[name] = "i32"
            if v % 16 == 0 and name not in free:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=sig, constexprs={(kernel.arg_names.index(k),): v for k, v in cons.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4}).metadata.shared


def shadow_ints(d: int, rank: int, chunk: int, hkv: int, hq: int, entries: int, capacity: int) -> dict:
    """The shadow kernel's integer arguments at a 32K step: coefficients (S, rank) shared by the KV heads, basis
    (Hkv, rank, D), cos (S, D), pools and chunk cache (slots, chunk, Hkv, D), `entries` chunks attended."""
    pool = (chunk * hkv * d, hkv * d, d)
    return dict(n_items=entries * chunk, per_split=entries * chunk // 4, group=hq // hkv, hq=hq, rank=rank,
                s_last=capacity - 1, n_fixed=6, res_lo=0, n_res=0, s_ah=0, s_at=rank, s_bh=rank * d, s_br=d, s_bd=1,
                s_ct=d, s_kslot=pool[0], s_kt=pool[1], s_kh=pool[2], s_vslot=pool[0], s_vt=pool[1], s_vh=pool[2],
                s_sh=entries, s_se=1, s_cslot=pool[0], s_ct2=pool[1], s_ch=pool[2], s_csh=entries - 6)


def cases():
    """(label, kernel, constexprs but BLOCK_N, integer arguments, dtype, element bytes, the block tierkv picks): the
    decode kernels at the shapes tierkv runs, in a 16-bit model (coefficients and basis share its dtype: the rebuild
    dot is 16-bit) and in fp32 (fp32 dots throughout)."""
    for d, rank, chunk, hkv, hq, model in ((128, 96, 32, 8, 32, "llama3.1-8b"), (256, 256, 16, 1, 4, "gemma3-270m defaults"),
                                           (256, 96, 32, 1, 4, "gemma3-270m at rank 96"),
                                           (64, 192, 16, 3, 9, "smollm2 defaults")):
        block_r = max(16, triton.next_power_of_2(rank))
        ints = shadow_ints(d, rank, chunk, hkv, hq, 2048 // chunk, 32768)
        for dt, elt in (("bf16", 2), ("fp32", 4)):
            yield (f"shadow {model} D={d} rank={rank} {dt}", shadow._shadow_split_kernel,
                   dict(CHUNK=chunk, HALF=d // 2, BLOCK_G=16, BLOCK_R=block_r, R_STEP=split_blocks.rank_step(block_r),
                        F32_DOT=elt == 4, USE_CACHE=True, LOWP_REBUILD=elt == 2, RES_KEYS=True),
                   ints, dt, elt, lambda d=d, rank=rank, elt=elt: split_blocks.shadow_split_block_n(GPU, d, rank, elt))
    for d, hkv, hq in ((128, 8, 32), (256, 1, 4)):
        ints = dict(n_items=32768, per_split=512, group=hq // hkv, hq=hq, s_kslot=32 * hkv * d, s_kt=hkv * d, s_kh=d,
                    s_vslot=32 * hkv * d, s_vt=hkv * d, s_vh=d, s_sh=1024, s_se=1)
        for dt, elt in (("bf16", 2), ("fp32", 4)):
            yield (f"dense paged D={d} {dt}", dense._split_kernel,
                   dict(PAGED=True, HAS_LEN=True, CHUNK=32, D=d, BLOCK_G=16, F32_DOT=elt == 4), ints, dt, elt,
                   lambda d=d, elt=elt: split_blocks.split_block_n(GPU, d, elt, dense.DENSE_STAGE_FACTOR))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", default="h100,rtx4090", help=f"of {', '.join(LIMITS)}")
    ap.add_argument("--out", help="JSON file to write")
    a = ap.parse_args()
    rows, bad = [], 0
    for gpu in a.gpus.split(","):
        if gpu not in LIMITS:
            sys.exit(f"--gpus: {gpu!r} is unknown; use some of {', '.join(LIMITS)}")
        arch, limit = LIMITS[gpu]
        split_blocks._LIMITS[GPU.index] = limit  # what split_blocks would read of such a card
        for label, kernel, cons, ints, dt, elt, pick in cases():
            block_n = pick()
            row = {"gpu": gpu, "case": label, "block_n": block_n, "limit": limit}
            if block_n is not None:  # None: the torch reference runs, nothing to compile
                row["shared"] = compiled_shared(kernel, {**cons, "BLOCK_N": block_n}, ints, dt, arch)
                row["fits"] = row["shared"] <= limit
                bad += not row["fits"]
                smaller = block_n // 2
                while not row["fits"] and smaller >= 16 and kernel is shadow._shadow_split_kernel:
                    # what the shadow kernel's launch falls back to (it halves the block on OutOfResources)
                    shared = compiled_shared(kernel, {**cons, "BLOCK_N": smaller}, ints, dt, arch)
                    if shared <= limit:
                        row["launch_falls_back_to"] = {"block_n": smaller, "shared": shared}
                        break
                    smaller //= 2
            print(json.dumps(row), flush=True)
            rows.append(row)
    if a.out:
        meta = {"date": date.today().isoformat(), "triton": triton.__version__, "host": platform.node(),
                "device": "none: compiled ahead of time for the GPUs named", "command": " ".join(sys.argv)}
        with open(a.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
