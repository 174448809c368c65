"""Triton twin of `chunk_topk_torch`: one kernel scores tokens in the low-rank space and reduces them per
chunk (scores never reach memory); normalisation, group max, masking and top-k are the shared torch tail.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tierkv.kernels.chunk_topk import _check, coeff_views, scale_views


@triton.jit
def _chunk_scores_kernel(
    q_ptr, a_ptr, rs_ptr, n_ptr, out_ptr, part_ptr,
    s_cap, rank, group, n_chunks, scale,
    s_qh, s_qg, s_ah, s_at, s_rh, s_rt, s_oh, s_og, s_ph, s_pg,
    MASS: tl.constexpr, ROW_SCALE: tl.constexpr, CHUNK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_R: tl.constexpr, ROWS: tl.constexpr,
):
    """Chunk scores for one KV head and BLOCK_C chunks. A (a_ptr) is fp32/bf16/fp16, or int8 rows with fp32 scales
    (rs_ptr, ROW_SCALE): int8 values are exact in bf16/fp16, so they share q's dot and are scaled after it."""
    h = tl.program_id(0)
    c0 = tl.program_id(1) * BLOCK_C
    n_tokens = tl.load(n_ptr)
    offs_g = tl.arange(0, BLOCK_G)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    q = tl.load(q_ptr + h * s_qh + offs_g[:, None] * s_qg + offs_r[None, :],
                mask=(offs_g[:, None] < group) & mask_r[None, :], other=0.0)  # (BLOCK_G, BLOCK_R)
    offs_t = c0 * CHUNK + tl.arange(0, BLOCK_C * CHUNK)
    valid = (offs_t < s_cap) & (offs_t < n_tokens)
    a = tl.load(a_ptr + h * s_ah + offs_t[:, None].to(tl.int64) * s_at + offs_r[None, :],
                mask=valid[:, None] & mask_r[None, :], other=0).to(q.dtype)  # (BLOCK_C*CHUNK, BLOCK_R)
    # half-precision inputs go to the tensor cores as they are (their products are exact in the fp32
    # accumulator); fp32 inputs keep the exact fp32 dot
    s = tl.dot(q, tl.trans(a), input_precision="ieee", out_dtype=tl.float32)  # (BLOCK_G, BLOCK_C*CHUNK)
    if ROW_SCALE:
        rs = tl.load(rs_ptr + h * s_rh + offs_t.to(tl.int64) * s_rt, mask=valid, other=0.0)  # (BLOCK_C*CHUNK,)
        s = s * rs.to(tl.float32)[None, :]
    s = s * scale
    if ROWS < BLOCK_G:
        # the dot needs 16 rows; only the first ROWS hold query heads. Keep those before the per-token exp and
        # log of the mass reduce, which would otherwise run on every padding row (4x the work for G = 4)
        s = tl.sum(tl.where((tl.arange(0, BLOCK_G // ROWS) == 0)[:, None, None],
                            tl.reshape(s, (BLOCK_G // ROWS, ROWS, BLOCK_C * CHUNK)), 0.0), axis=0)  # (ROWS, N)
    offs_g = tl.arange(0, ROWS)
    s = tl.where(valid[None, :], s, float("-inf"))
    s3 = tl.reshape(s, (ROWS, BLOCK_C, CHUNK))
    mx = tl.max(s3, axis=2)  # (BLOCK_G, BLOCK_C)
    if MASS:
        safe = tl.where(mx == float("-inf"), 0.0, mx)
        total = tl.sum(tl.exp(s3 - safe[:, :, None]), axis=2)
        mx = tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + safe, float("-inf"))
    offs_c = c0 + tl.arange(0, BLOCK_C)
    o_mask = (offs_g[:, None] < group) & (offs_c[None, :] < n_chunks)
    tl.store(out_ptr + h * s_oh + offs_g[:, None] * s_og + offs_c[None, :], mx, mask=o_mask)
    if MASS:  # this block's share of each query head's total mass, so the top-k tail need not re-read all chunks
        tl.store(part_ptr + h * s_ph + offs_g * s_pg + tl.program_id(1), _lse_rows(mx, 1), mask=offs_g < group)


def chunk_scores_triton(
    q_low: torch.Tensor, coeffs: torch.Tensor, n_tokens: torch.Tensor | int, chunk_size: int, scale: float, reduce: str,
    with_parts: bool = False, *, row_scale: torch.Tensor | None = None,
):
    """Same contract as `chunk_scores_torch`; chunk_size must be a power of two <= 256. One launch.

    with_parts=True also returns the log-sum-exp of each program's block of chunks, (Hkv, G, blocks) fp32
    ('mass' reduces only; the chunk scores themselves otherwise)."""
    if chunk_size & (chunk_size - 1) or chunk_size > 256:
        raise ValueError(f"chunk_topk_triton needs chunk_size a power of two <= 256, got {chunk_size}")
    hkv, g, rank = q_low.shape
    a3 = coeff_views(q_low, coeffs)  # (Hkv, S, r)
    if a3.stride(-1) != 1:
        a3 = a3.contiguous()
    # the reference scores in fp32 from q_low and A as given; bf16/fp16 pairs keep their dtype for the dot, and so
    # do int8 rows (exact in bf16/fp16)
    half = a3.dtype in (q_low.dtype, torch.int8) and q_low.dtype in (torch.bfloat16, torch.float16) \
        and q_low.device.type == "cuda"
    q_low = (q_low if half else q_low.float()).contiguous()
    s_cap = a3.shape[1]
    n_chunks = -(-s_cap // chunk_size)
    if not isinstance(n_tokens, torch.Tensor):
        n_tokens = torch.full((), n_tokens, dtype=torch.int64, device=q_low.device)
    out = torch.empty((hkv, g, n_chunks), device=q_low.device, dtype=torch.float32)  # (Hkv, G, C)
    block_c = max(1, 256 // chunk_size)
    blocks = triton.cdiv(n_chunks, block_c)
    parts = torch.empty((hkv, g, blocks), device=q_low.device, dtype=torch.float32) if reduce != "max" else out
    rs = out if row_scale is None else scale_views(q_low, row_scale)  # (Hkv, S); out: unread placeholder
    _chunk_scores_kernel[(hkv, blocks)](
        q_low, a3, rs, n_tokens, out, parts, s_cap, rank, g, n_chunks, scale,
        q_low.stride(0), q_low.stride(1), a3.stride(0), a3.stride(1), rs.stride(0), rs.stride(-1),
        out.stride(0), out.stride(1), parts.stride(0), parts.stride(1),
        MASS=reduce != "max", ROW_SCALE=row_scale is not None, CHUNK=chunk_size, BLOCK_C=block_c,
        BLOCK_G=max(16, triton.next_power_of_2(g)), BLOCK_R=max(16, triton.next_power_of_2(rank)),
        ROWS=triton.next_power_of_2(g),
    )
    return (out, parts) if with_parts else out


@triton.jit
def _lse_rows(x, axis: tl.constexpr):
    """log-sum-exp along axis; -inf where every entry is -inf."""
    mx = tl.max(x, axis)
    safe = tl.where(mx == float("-inf"), 0.0, mx)
    total = tl.sum(tl.exp(x - tl.expand_dims(safe, axis)), axis)
    return tl.where(total > 0, tl.log(tl.where(total > 0, total, 1.0)) + safe, float("-inf"))


@triton.jit
def _group_best(
    red_ptr, part_ptr, end_ptr, h, offs_c, n_chunks, n_parts, group, first, s_rh, s_rg, s_ph, s_pg,
    MASS: tl.constexpr, GROUP_MASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """select_top_chunks' tail before top-k for KV head h and chunks offs_c: normalise each query head's chunk
    scores by its total log-sum-exp (combined from n_parts partial ones), reduce over the group, -inf for chunks
    outside [first, select_end) or past n_chunks."""
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < group
    shift = tl.zeros([BLOCK_G], tl.float32)
    if MASS:  # online log-sum-exp over the partials of each query head
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        acc = tl.zeros([BLOCK_G], tl.float32)
        for p0 in range(0, n_parts, BLOCK_P):
            offs_p = p0 + tl.arange(0, BLOCK_P)
            x = tl.load(part_ptr + h * s_ph + offs_g[:, None] * s_pg + offs_p[None, :],
                        mask=mask_g[:, None] & (offs_p < n_parts)[None, :], other=float("-inf"))
            m_new = tl.maximum(m, tl.max(x, 1))
            safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - safe) + tl.sum(tl.exp(x - safe[:, None]), 1)
            m = m_new
        safe = tl.where(m == float("-inf"), 0.0, m)
        shift = tl.where(acc > 0, tl.log(tl.where(acc > 0, acc, 1.0)) + safe, 0.0)
    x = tl.load(red_ptr + h * s_rh + offs_g[:, None] * s_rg + offs_c[None, :],
                mask=mask_g[:, None] & (offs_c < n_chunks)[None, :], other=float("-inf"))
    x = x - shift[:, None]
    if GROUP_MASS:
        best = _lse_rows(x, 0)
    else:
        best = tl.max(x, 0)
    return tl.where((offs_c >= first) & (offs_c < tl.load(end_ptr)), best, float("-inf"))


@triton.jit
def _group_reduce_kernel(
    red_ptr, part_ptr, out_ptr, end_ptr, n_chunks, n_parts, group, first, s_rh, s_rg, s_ph, s_pg, s_oh,
    MASS: tl.constexpr, GROUP_MASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """`_group_best` of one KV head and one block of chunks, stored (the top-k is left to torch)."""
    h = tl.program_id(0)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    best = _group_best(red_ptr, part_ptr, end_ptr, h, offs_c, n_chunks, n_parts, group, first, s_rh, s_rg, s_ph,
                       s_pg, MASS, GROUP_MASS, BLOCK_G, BLOCK_P)
    tl.store(out_ptr + h * s_oh + offs_c, best, mask=offs_c < n_chunks)


# Fused top-k. A (score, chunk id) pair is one int64 key: the fp32 score as an order-preserving int32 in the high
# half, 2**31 - 1 - id in the low half, so keys never tie, sort like scores, and a tie goes to the lower id.
_PAD_KEY = tl.constexpr(1 - 2**63)  # below every score's key (-inf included): padding, never picked while k <= C


@triton.jit
def _pack_keys(score, ids, valid):
    score = tl.where(score == 0.0, 0.0, score)  # -0.0 packs as 0.0, its tie
    bits = score.to(tl.int32, bitcast=True)
    hi = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats order backwards: flip all but the sign
    key = (hi.to(tl.int64) << 32) | (0x7FFFFFFF - ids).to(tl.int64)
    return tl.where(valid, key, _PAD_KEY)


@triton.jit
def _store_picks(key, top_ptr, score_ptr, k, K: tl.constexpr):
    """Unpacks the first k of K sorted keys into chunk ids (int64) and fp32 scores."""
    offs = tl.arange(0, K)
    hi = (key >> 32).to(tl.int32)
    bits = hi ^ ((hi >> 31) & 0x7FFFFFFF)
    tl.store(top_ptr + offs, 0x7FFFFFFF - (key & 0x7FFFFFFF), mask=offs < k)
    tl.store(score_ptr + offs, bits.to(tl.float32, bitcast=True), mask=offs < k)


@triton.jit
def _bitonic_merge(x, N: tl.constexpr, S: tl.constexpr, DESC: tl.constexpr):
    """Sorts each bitonic run of 2**S elements of x (N,): all descending if DESC, else even runs descending and
    odd runs ascending (pairs of opposite runs are what the next merge takes)."""
    for i in tl.static_range(S):
        # compare-and-swap x[e] and x[e + J], J = 2**(S-1-i): (M, 2, J) with M = N / (2 J) (shapes stay inline:
        # a constexpr cannot be reassigned in the unrolled loop)
        y = tl.reshape(x, (N >> (S - i), 2, 1 << (S - 1 - i)))
        hi = tl.max(y, 1)
        lo = tl.min(y, 1)  # (M, J)
        if DESC:
            first = hi
            second = lo
        else:
            down = (((tl.arange(0, N >> (S - i)) >> i) & 1) == 0)[:, None]  # outer row r lies in run r >> i
            first = tl.where(down, hi, lo)
            second = tl.where(down, lo, hi)
        side = tl.arange(0, 2)[None, :, None]
        x = tl.reshape(tl.where(side == 0, first[:, None, :], second[:, None, :]), (N,))
    return x


@triton.jit
def _topk_desc(x, LOG_N: tl.constexpr, LOG_K: tl.constexpr, SORT_RUNS: tl.constexpr):
    """The 2**LOG_K largest of x (2**LOG_N,) int64, largest first. Bitonic top-k: sort runs of K alternately
    descending / ascending (skipped unless SORT_RUNS: x comes that way), then halve until one run is left: the
    elementwise max of two opposite runs is a bitonic run holding their K largest, and one merge sorts it."""
    N: tl.constexpr = 1 << LOG_N
    K: tl.constexpr = 1 << LOG_K
    if SORT_RUNS:
        for s in tl.static_range(1, LOG_K + 1):
            x = _bitonic_merge(x, N, s, s == LOG_N)
    for t in tl.static_range(LOG_N - LOG_K):
        x = tl.reshape(tl.max(tl.reshape(x, (N >> (t + 1 + LOG_K), 2, K)), 1), (N >> (t + 1),))
        x = _bitonic_merge(x, N >> (t + 1), LOG_K, t == LOG_N - LOG_K - 1)
    return x


@triton.jit
def _group_topk_kernel(
    red_ptr, part_ptr, end_ptr, cand_ptr, top_ptr, score_ptr, n_chunks, n_parts, group, first, k,
    s_rh, s_rg, s_ph, s_pg,
    MASS: tl.constexpr, GROUP_MASS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr,
    LOG_C: tl.constexpr, LOG_K: tl.constexpr, FINAL: tl.constexpr,
):
    """Stage 1 of the fused select, one KV head x 2**LOG_C chunks: the block's 2**LOG_K best keys, best first,
    to cand (Hkv, blocks, K); FINAL (a single block): the picks themselves."""
    h = tl.program_id(0)
    blk = tl.program_id(1)
    offs_c = blk * (1 << LOG_C) + tl.arange(0, 1 << LOG_C)
    best = _group_best(red_ptr, part_ptr, end_ptr, h, offs_c, n_chunks, n_parts, group, first, s_rh, s_rg, s_ph,
                       s_pg, MASS, GROUP_MASS, BLOCK_G, BLOCK_P)
    key = _topk_desc(_pack_keys(best, offs_c, offs_c < n_chunks), LOG_C, LOG_K, True)  # (K,)
    if FINAL:
        _store_picks(key, top_ptr + h * k, score_ptr + h * k, k, 1 << LOG_K)
    else:
        tl.store(cand_ptr + (h * tl.num_programs(1) + blk) * (1 << LOG_K) + tl.arange(0, 1 << LOG_K), key)


@triton.jit
def _merge_topk_kernel(cand_ptr, top_ptr, score_ptr, n_cand, k, LOG_N: tl.constexpr, LOG_K: tl.constexpr):
    """Stage 2, one KV head: the k best of its n_cand candidate keys (sorted runs of K, padded to 2**LOG_N)."""
    h = tl.program_id(0)
    K: tl.constexpr = 1 << LOG_K
    offs = tl.arange(0, 1 << LOG_N)
    run = offs // K
    j = offs % K
    src = run * K + tl.where((run % 2) == 1, K - 1 - j, j)  # odd runs back to front: (descending, ascending) pairs
    key = tl.load(cand_ptr + h * n_cand + src, mask=src < n_cand, other=_PAD_KEY)
    _store_picks(_topk_desc(key, LOG_N, LOG_K, False), top_ptr + h * k, score_ptr + h * k, k, K)


_FUSED_MAX_K = 256  # larger k (never a chunk budget here) takes `group_best_triton` + torch top-k


def group_best_triton(red: torch.Tensor, select_end: torch.Tensor, first: int, reduce: str,
                       parts: torch.Tensor) -> torch.Tensor:
    """(Hkv, C) fp32 scores of `_group_best`, in one launch (the tail before top-k); red, parts contiguous."""
    hkv, g, c = red.shape
    best = torch.empty((hkv, c), device=red.device, dtype=torch.float32)  # (Hkv, C)
    block_c = 256
    _group_reduce_kernel[(hkv, triton.cdiv(c, block_c))](
        red, parts, best, select_end, c, parts.shape[-1], g, first, red.stride(0), red.stride(1),
        parts.stride(0), parts.stride(1), best.stride(0),
        MASS=reduce != "max", GROUP_MASS=reduce == "group-mass", BLOCK_G=max(2, triton.next_power_of_2(g)),
        BLOCK_P=1024, BLOCK_C=block_c,
    )
    return best


def _topk_plan(c: int, k_pad: int, blocks: int = 8) -> tuple[int, int, int]:
    """(chunks per stage-1 program, its warps, stage 2's warps). About `blocks` programs per KV head, of at most
    2048 chunks: stage 2 (one program per head) costs more per key than stage 1, but a stage-1 program's passes
    grow with its block. Chosen from graph-replay timings on an H200 at Hkv=8, G=4, k=64 and 256, C=1K..32K (a
    helper session's sweep, not committed; the H100 result is bench/results/kernels-select-top-h100-2026-11-26.json)."""
    block_c = max(256, k_pad, min(2048, triton.next_power_of_2(triton.cdiv(c, blocks))))
    n = triton.next_power_of_2(triton.cdiv(c, block_c)) * k_pad
    return block_c, 4 if block_c <= 512 else 8, 2 if n <= 2048 else 4 if n <= 4096 else 8


def select_top_chunks_triton(red: torch.Tensor, select_end: torch.Tensor | int, k: int, first: int,
                             reduce: str, parts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as chunk_topk.select_top_chunks (ties to the lower chunk id), in at most two launches, no host
    sync: per block of chunks, normalise, reduce over the group, mask and keep the block's k best (bitonic top-k
    on int64 keys); then one program per KV head merges the blocks' candidates. k > 256 takes the reduce kernel
    and torch's top-k instead.

    parts: optional (Hkv, G, P) partial log-sum-exps whose total equals that of red's rows (the scoring kernel's).
    """
    hkv, g, c = red.shape
    if not 0 < k <= c:
        raise ValueError(f"chunk_topk: k={k} must be in 1..{c} (the chunk count)")
    if not isinstance(select_end, torch.Tensor):
        select_end = torch.full((), select_end, dtype=torch.int64, device=red.device)
    red = red.contiguous()
    parts = red if parts is None else parts.contiguous()
    k_pad = triton.next_power_of_2(k)
    if k_pad > _FUSED_MAX_K:
        from tierkv.kernels.chunk_topk import topk_lower_id_first

        return topk_lower_id_first(group_best_triton(red, select_end, first, reduce, parts), k)
    block_c, warps, merge_warps = _topk_plan(c, k_pad)
    blocks = triton.cdiv(c, block_c)
    top = torch.empty((hkv, k), device=red.device, dtype=torch.int64)
    scores = torch.empty((hkv, k), device=red.device, dtype=torch.float32)
    cand = torch.empty((hkv, blocks, k_pad), device=red.device, dtype=torch.int64) if blocks > 1 else top  # keys
    _group_topk_kernel[(hkv, blocks)](
        red, parts, select_end, cand, top, scores, c, parts.shape[-1], g, first, k,
        red.stride(0), red.stride(1), parts.stride(0), parts.stride(1),
        MASS=reduce != "max", GROUP_MASS=reduce == "group-mass", BLOCK_G=max(2, triton.next_power_of_2(g)),
        BLOCK_P=1024, LOG_C=block_c.bit_length() - 1, LOG_K=k_pad.bit_length() - 1, FINAL=blocks == 1,
        num_warps=warps,
    )
    if blocks > 1:
        n = triton.next_power_of_2(blocks) * k_pad
        _merge_topk_kernel[(hkv,)](cand, top, scores, blocks * k_pad, k, LOG_N=n.bit_length() - 1,
                                   LOG_K=k_pad.bit_length() - 1, num_warps=merge_warps)
    return top, scores


def chunk_topk_triton(
    q_low: torch.Tensor,
    coeffs: torch.Tensor,
    n_tokens: torch.Tensor | int,
    select_end: torch.Tensor | int,
    k: int,
    chunk_size: int,
    scale: float,
    first: int = 0,
    reduce: str = "mass",
    *,
    row_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `chunk_topk_torch`: fused score + per-chunk reduce, then the shared torch tail."""
    _check(q_low, coeffs, reduce, row_scale)
    red, parts = chunk_scores_triton(q_low, coeffs, n_tokens, chunk_size, scale, reduce, with_parts=True,
                                     row_scale=row_scale)
    return select_top_chunks_triton(red, select_end, k, first, reduce, parts if reduce != "max" else None)
