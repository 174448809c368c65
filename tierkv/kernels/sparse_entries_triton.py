"""Triton twin of `sparse_entries_torch`: one program per KV head writes its whole entry list."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["res_lo"])  # the resident start follows the KV budget: one compile for all
def _entries_kernel(top_ptr, score_ptr, picks_ptr, covered_ptr, outlier_ptr, fid_ptr, flen_ptr,
                    slot_ptr, len_ptr, cid_ptr, count_ptr, n_fixed, k, n_chunks, chunk, res_lo, res_hi, s_th, s_oh,
                    BLOCK: tl.constexpr, COUNT: tl.constexpr):
    h = tl.program_id(0)
    e = tl.arange(0, BLOCK)
    is_fixed = e < n_fixed
    j = e - n_fixed
    is_pick = (j >= 0) & (j < k)
    fid = tl.load(fid_ptr + e, mask=is_fixed, other=0)
    flen = tl.load(flen_ptr + e, mask=is_fixed, other=0)
    top = tl.load(top_ptr + h * s_th + j, mask=is_pick, other=0)
    score = tl.load(score_ptr + h * s_th + j, mask=is_pick, other=float("-inf"))
    picked = is_pick & (j < tl.load(picks_ptr)) & (score > float("-inf")) & (score < float("inf"))
    safe = tl.minimum(tl.maximum(top, 0), n_chunks - 1)
    out = tl.load(outlier_ptr + safe, mask=is_pick, other=1) != 0
    rebuild = picked & (top < tl.load(covered_ptr)) & ~out
    ids = tl.where(is_fixed, fid, top)
    lengths = tl.where(is_fixed, flen, tl.where(picked, chunk, 0))
    cids = tl.where(rebuild, top, -1)
    m = e < n_fixed + k
    slots = tl.minimum(tl.maximum(ids, 0), n_chunks - 1)
    tl.store(slot_ptr + h * s_oh + e, slots, mask=m)
    tl.store(len_ptr + h * s_oh + e, lengths.to(tl.int64), mask=m)
    tl.store(cid_ptr + h * s_oh + e, cids.to(tl.int64), mask=m)
    if COUNT:
        tl.atomic_add(count_ptr, tl.sum(tl.where(is_fixed, flen, 0).to(tl.int64)))
        tl.atomic_add(count_ptr + 1, tl.sum(picked.to(tl.int64)))
        tl.atomic_add(count_ptr + 2, tl.sum((picked & ~rebuild).to(tl.int64)))
        on_gpu = (slots >= res_lo) & (slots < res_hi)
        tl.atomic_add(count_ptr + 3, tl.sum((picked & on_gpu).to(tl.int64)))
        tl.atomic_add(count_ptr + 4, tl.sum(tl.where(is_fixed & on_gpu, flen, 0).to(tl.int64)))
        tl.atomic_add(count_ptr + 5, tl.sum((picked & ~rebuild & on_gpu).to(tl.int64)))


def sparse_entries_triton(top, score, picks, covered, outlier, fixed_ids, fixed_len, chunk: int, n_chunks: int,
                          counts=None, resident: tuple[int, int] = (0, 0)):
    """Same contract as `sparse_entries_torch`. One launch."""
    hkv, k = top.shape
    f = fixed_ids.shape[0]
    top, score = top.contiguous(), score.contiguous()
    out = torch.empty((3, hkv, f + k), dtype=torch.int64, device=top.device)  # slots, lengths, cids
    _entries_kernel[(hkv,)](
        top, score, picks, covered, outlier.view(torch.uint8), fixed_ids.contiguous(), fixed_len.contiguous(),
        out[0], out[1], out[2], out if counts is None else counts, f, k, n_chunks, chunk, *resident, top.stride(0),
        out.stride(1), BLOCK=triton.next_power_of_2(f + k), COUNT=counts is not None,
    )
    return out[0], out[1], out[2]
