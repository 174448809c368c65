"""Span attention (many query tokens over one K/V batch, with log-sum-exp): the reference against naive float64,
the fused ATen path against the reference (CPU here, CUDA under -m cuda), and batches merged by OnlineSoftmax
equal to attention over the union."""

import math

import pytest
import torch

from tests.kernels.kutil import TOL, max_diff, randn
from tierkv.kernels.span_attention import causal_gqa_attention, span_attention_fused, span_attention_torch
from tierkv.kernels.online_softmax import OnlineSoftmax

SHAPES = [(8, 2, 16), (9, 3, 8), (4, 4, 64)]  # (Hq, Hkv, D)


def naive(q, k, v, causal):
    """float64 per query token and head: out (T, Hq, D), lse (T, Hq)."""
    t, hq, d = q.shape
    g = hq // k.shape[1]
    out = torch.zeros(t, hq, d, dtype=torch.float64)
    lse = torch.zeros(t, hq, dtype=torch.float64)
    for i in range(t):
        for h in range(hq):
            n = i + 1 if causal else k.shape[0]
            s = (k[:n, h // g].double() @ q[i, h].double()) / math.sqrt(d)
            lse[i, h] = torch.logsumexp(s, 0)
            out[i, h] = torch.softmax(s, 0) @ v[:n, h // g].double()
    return out, lse


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_reference_matches_naive(gen, hq, hkv, d, causal):
    t, s = (300, 300) if causal else (300, 45)  # more rows than one tile of the reference
    q, k, v = randn(gen, t, hq, d), randn(gen, s, hkv, d), randn(gen, s, hkv, d)
    out, lse = span_attention_torch(q, k, v, causal)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (t, hq, d) and lse.shape == (t, hq)
    want_out, want_lse = naive(q, k, v, causal)
    assert max_diff("ref out", out, want_out) < 2e-5
    assert max_diff("ref lse", lse, want_lse) < 1e-4


def _fused_vs_reference(gen, device, dtype, hq, hkv, d, causal):
    t, s = (67, 67) if causal else (67, 130)
    q, k, v = (randn(gen, n, h, d, dtype=dtype, device=device) for n, h in ((t, hq), (s, hkv), (s, hkv)))
    out, lse = span_attention_fused(q, k, v, causal)
    want_out, want_lse = span_attention_torch(q, k, v, causal)
    assert out.dtype == lse.dtype == torch.float32 and out.shape == (t, hq, d) and lse.shape == (t, hq)
    assert max_diff(f"fused out {dtype}", out, want_out) < TOL[dtype]
    assert max_diff(f"fused lse {dtype}", lse, want_lse) < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_fused_matches_reference_cpu(gen, dtype, hq, hkv, d, causal):
    _fused_vs_reference(gen, "cpu", dtype, hq, hkv, d, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (9, 3, 64)])
def test_fused_matches_reference_cuda(gen, dtype, hq, hkv, d, causal):
    if not torch.cuda.is_available():
        pytest.skip("the fused CUDA path needs a GPU (the interpreter does not run ATen kernels)")
    _fused_vs_reference(gen, "cuda", dtype, hq, hkv, d, causal)


def _whole_layer_vs_reference(gen, device, dtype, hq, hkv, d):
    q, k, v = (randn(gen, 300, h, d, dtype=dtype, device=device) for h in (hq, hkv, hkv))
    out = causal_gqa_attention(q, k, v)
    want, _ = span_attention_torch(q, k, v, causal=True)
    assert out.dtype == dtype and out.shape == (300, hq, d)
    assert max_diff(f"whole-layer {dtype}", out.float(), want) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", SHAPES)
def test_whole_layer_causal_gqa_matches_reference_cpu(gen, dtype, hq, hkv, d):
    _whole_layer_vs_reference(gen, "cpu", dtype, hq, hkv, d)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv,d", [(32, 8, 128), (4, 1, 256)])
def test_whole_layer_causal_gqa_matches_reference_cuda(gen, dtype, hq, hkv, d):
    if not torch.cuda.is_available():
        pytest.skip("the fused CUDA path needs a GPU (the interpreter does not run ATen kernels)")
    _whole_layer_vs_reference(gen, "cuda", dtype, hq, hkv, d)


def test_online_softmax_merges_spans_and_masked_batches(gen):
    """Unmasked batches (fused), a per-head masked batch (math path) and the causal tail merge to the union."""
    t, hq, hkv, d = 5, 8, 2, 16
    q = randn(gen, t, hq, d)
    old = [randn(gen, n, hkv, d) for n in (40, 0, 13)], [randn(gen, n, hkv, d) for n in (40, 0, 13)]
    k_new, v_new = randn(gen, t, hkv, d), randn(gen, t, hkv, d)
    state = OnlineSoftmax(q, hkv)
    for k, v in zip(*old):
        state.add_span(k, v)
    km, vm = randn(gen, 9, hkv, d), randn(gen, 9, hkv, d)
    keep = torch.ones(hkv, 9, dtype=torch.bool)
    keep[1, 4:] = False  # KV head 1 sees only the first 4 keys of this batch
    state.add(km, vm, keep.view(hkv, 1, 1, 9))
    state.add_span(k_new, v_new, causal=True)
    got = state.result()
    g = hq // hkv
    for i in range(t):
        for h in range(hq):
            n_m = 9 if h // g == 0 else 4
            ks = torch.cat([*old[0], km[:n_m], k_new[:i + 1]])[:, h // g]
            vs = torch.cat([*old[1], vm[:n_m], v_new[:i + 1]])[:, h // g]
            want = torch.softmax(ks @ q[i, h] / math.sqrt(d), 0) @ vs
            assert (got[i, h] - want).abs().max() < 2e-5
