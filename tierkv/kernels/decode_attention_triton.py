"""Triton split-K (flash-decoding) attention for one query token, dense or read from a chunk pool.

Pass 1: one program per (KV head, split) runs an online softmax for the head's whole query group and
writes a partial (out, lse); pass 2 merges the splits (also exposed as `merge_partials_triton`).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from tierkv.kernels.decode_attention import decode_attention_torch, paged_decode_attention_torch
from tierkv.kernels.split_blocks import split_block_n

_LOG2E = 1.4426950408889634
DENSE_STAGE_FACTOR = 5  # shared bytes per (key x D x element) of _split_kernel, see kernels/split_blocks.py


@triton.jit
def _split_kernel(
    q_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, po_ptr, pl_ptr,
    n_items, per_split, scale_log2, group, hq,
    s_kslot, s_kt, s_kh, s_vslot, s_vt, s_vh, s_sh, s_se,
    PAGED: tl.constexpr, HAS_LEN: tl.constexpr, CHUNK: tl.constexpr, D: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr,
):
    h = tl.program_id(0)
    sp = tl.program_id(1)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < group
    offs_d = tl.arange(0, D)
    rows = h * group + offs_g  # query heads of this KV head
    q = tl.load(q_ptr + rows[:, None] * D + offs_d[None, :], mask=mask_g[:, None], other=0.0)  # (BLOCK_G, D)
    if F32_DOT:
        q = q.to(tl.float32)
    start = sp * per_split
    end = tl.minimum(start + per_split, n_items)
    if HAS_LEN:
        end = tl.minimum(end, tl.load(len_ptr + h))
    m_i = tl.full([BLOCK_G], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i in range(0, per_split, BLOCK_N):  # fixed trip count; blocks past `end` are masked
        offs = start + i + tl.arange(0, BLOCK_N)
        valid = offs < end
        if PAGED:
            entry = offs // CHUNK
            j = offs % CHUNK
            slot = tl.load(slot_ptr + h * s_sh + entry * s_se, mask=valid, other=0).to(tl.int64)
            ln = tl.load(len_ptr + h * s_sh + entry * s_se, mask=valid, other=0)
            valid = valid & (j < ln)
            k_row = slot * s_kslot + j * s_kt + h * s_kh
            v_row = slot * s_vslot + j * s_vt + h * s_vh
        else:
            k_row = offs.to(tl.int64) * s_kt + h * s_kh
            v_row = offs.to(tl.int64) * s_vt + h * s_vh
        k = tl.load(k_ptr + k_row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        v = tl.load(v_ptr + v_row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, D)
        if F32_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2  # (BLOCK_G, BLOCK_N)
        m_i, l_i, acc = online_softmax_step(s, valid, v, m_i, l_i, acc)
    store_partial(po_ptr, pl_ptr, sp, hq, rows, mask_g, offs_d, m_i, l_i, acc, D)


@triton.jit
def online_softmax_step(s, valid, v, m_i, l_i, acc):
    """Fold one block of base-2 scores s (BLOCK_G, BLOCK_N) and values v (BLOCK_N, D) into the running state."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def store_partial(po_ptr, pl_ptr, sp, hq, rows, mask_g, offs_d, m_i, l_i, acc, D: tl.constexpr):
    """Write one split's normalised output (P, Hq, D) and natural-log lse (P, Hq); empty splits get 0 and -inf."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(po_ptr + (sp * hq + rows)[:, None] * D + offs_d[None, :], out, mask=mask_g[:, None])
    tl.store(pl_ptr + sp * hq + rows, lse, mask=mask_g)


@triton.jit
def _merge_kernel(po_ptr, pl_ptr, out_ptr, lse_ptr, parts, hq, D: tl.constexpr, BLOCK_P: tl.constexpr):
    g = tl.program_id(0)
    offs_p = tl.arange(0, BLOCK_P)
    mask_p = offs_p < parts
    offs_d = tl.arange(0, D)
    lse = tl.load(pl_ptr + offs_p * hq + g, mask=mask_p, other=float("-inf")).to(tl.float32)  # (BLOCK_P,)
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    total = tl.sum(w, axis=0)
    o = tl.load(po_ptr + (offs_p[:, None] * hq + g) * D + offs_d[None, :], mask=mask_p[:, None], other=0.0)
    out = tl.sum(w[:, None] * o.to(tl.float32), axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + g * D + offs_d, out.to(out_ptr.dtype.element_ty))
    tl.store(lse_ptr + g, tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + m, float("-inf")))


def merge_splits(po: torch.Tensor, pl: torch.Tensor, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    parts, hq, d = po.shape
    out = torch.empty((hq, d), device=po.device, dtype=out_dtype)  # (Hq, D)
    lse = torch.empty((hq,), device=po.device, dtype=torch.float32)  # (Hq,)
    _merge_kernel[(hq,)](po, pl, out, lse, parts, hq, D=d, BLOCK_P=max(2, triton.next_power_of_2(parts)))
    return out, lse


def merge_partials_triton(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `merge_partials_torch`; one launch."""
    return merge_splits(outs.contiguous(), lses.contiguous(), outs.dtype)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def plan_splits(q: torch.Tensor, hkv: int, n_items: int, block_n: int, num_splits: int | None):
    """Split count, items per split and the partial buffers (P, Hq, D), (P, Hq) fp32 for one launch."""
    blocks = max(1, triton.cdiv(n_items, block_n))
    if num_splits is None:  # about two programs per SM, each with at least one block of keys
        num_splits = min(blocks, max(1, triton.cdiv(2 * _num_sms(q.device), hkv)))
    per_split = triton.cdiv(blocks, num_splits) * block_n
    num_splits = max(1, triton.cdiv(n_items, per_split))
    po = torch.empty((num_splits, q.shape[0], q.shape[1]), device=q.device, dtype=torch.float32)  # (P, Hq, D)
    pl = torch.empty((num_splits, q.shape[0]), device=q.device, dtype=torch.float32)  # (P, Hq)
    return num_splits, per_split, po, pl


def _run(q, k, v, slots, lens, n_items, chunk, paged, has_len, scale, num_splits):
    hq, d = q.shape
    hkv = k.shape[-2]
    if d & (d - 1) or d < 16:
        raise ValueError(f"decode attention (Triton) needs D a power of two >= 16, got {d}")
    group = hq // hkv
    scale = d**-0.5 if scale is None else scale
    block_n = split_block_n(q.device, d, 4 if q.dtype == torch.float32 else k.element_size(), DENSE_STAGE_FACTOR)
    num_splits, per_split, po, pl = plan_splits(q, hkv, n_items, block_n, num_splits)
    q = q.contiguous()
    ss = slots.stride() if paged else (0, 0)
    _split_kernel[(hkv, num_splits)](
        q, k, v, slots, lens, po, pl, n_items, per_split, scale * _LOG2E, group, hq,
        k.stride(0) if paged else 0, k.stride(-3), k.stride(-2), v.stride(0) if paged else 0, v.stride(-3), v.stride(-2),
        ss[0], ss[1],
        PAGED=paged, HAS_LEN=has_len, CHUNK=chunk, D=d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        F32_DOT=q.dtype == torch.float32 or q.device.type != "cuda",  # the CPU interpreter's bf16 dot is wrong
    )
    return merge_splits(po, pl, q.dtype)


def _fits(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a block of keys fits the GPU's shared memory (else the torch reference runs)."""
    elt = 4 if q.dtype == torch.float32 else k.element_size()
    return split_block_n(q.device, q.shape[-1], elt, DENSE_STAGE_FACTOR) is not None


def decode_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: torch.Tensor | None = None, scale: float | None = None,
    num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `decode_attention_torch` (k, v need a unit stride on D). Two launches, no host sync."""
    if not _fits(q, k):
        return decode_attention_torch(q, k, v, kv_len, scale)
    lens = kv_len if kv_len is not None else q  # placeholder pointer, unused without HAS_LEN
    return _run(q, k, v, q, lens, k.shape[0], 1, False, kv_len is not None, scale, num_splits)


def paged_decode_attention_triton(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, lengths: torch.Tensor,
    scale: float | None = None, num_splits: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `paged_decode_attention_torch`; slots and lengths must share strides."""
    if not _fits(q, k_pool):
        return paged_decode_attention_torch(q, k_pool, v_pool, slots, lengths, scale)
    if slots.stride() != lengths.stride():
        lengths = lengths.expand_as(slots).contiguous()
        slots = slots.contiguous()
    chunk = k_pool.shape[1]
    return _run(q, k_pool, v_pool, slots, lengths, slots.shape[1] * chunk, chunk, True, False, scale, num_splits)
