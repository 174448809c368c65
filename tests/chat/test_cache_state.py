"""KV cache session hooks: export, import and truncate agree between the dense and the tiered cache."""

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions

L, HQ, HKV, D, C = 2, 4, 2, 8, 4
CB = 2 * C * HKV * D * 4


def tiered(tmp_path):
    cfg = TierConfig(kv_gpu_budget=10 * CB, cpu_budget=3 * CB, disk_dir=str(tmp_path), chunk_size=C, sink_tokens=4,
                     window_tokens=4)
    return TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=cfg,
                         options=TieredOptions(batch_tokens=8, io_threads=1))


def dense():
    return DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=4)


def feed(cache, steps, g):
    outs = []
    for t in steps:
        for layer in range(L):
            k, v, q = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g), torch.randn(t, HQ, D, generator=g)
            cache.append(layer, k, v, k_pre=k)
            outs.append(cache.attend(layer, q))
        cache.advance(t)
    return outs


@pytest.mark.parametrize("kind", ["dense", "tiered"])
def test_truncate_then_continue_equals_never_having_gone_further(tmp_path, kind):
    make = (lambda: tiered(tmp_path)) if kind == "tiered" else dense
    a, b = make(), make()
    feed(a, [9, 1, 1, 5], torch.Generator().manual_seed(0))
    feed(b, [9, 1, 1, 5], torch.Generator().manual_seed(0))
    feed(a, [13, 2], torch.Generator().manual_seed(1))  # a goes further, then rolls back to b's length
    a.truncate(16)
    for cut in (16, 14, 13):  # inside a chunk, at a chunk boundary's neighbour
        a.truncate(cut)
        b.truncate(cut)
        for layer in range(L):
            torch.testing.assert_close(a.export_kv(layer, 0, cut), b.export_kv(layer, 0, cut), atol=0, rtol=0)
    oa, ob = feed(a, [7, 1, 1], torch.Generator().manual_seed(2)), feed(b, [7, 1, 1], torch.Generator().manual_seed(2))
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    if kind == "tiered":
        s = a.stats()
        assert sum(s["chunks"].values()) == L * (a.seq_len // C) and s["chunks"]["disk"] > 0
    a.close(), b.close()


@pytest.mark.parametrize("src_kind,dst_kind", [("tiered", "dense"), ("dense", "tiered")])
def test_export_import_roundtrip_across_kinds(tmp_path, src_kind, dst_kind):
    make = {"dense": dense, "tiered": lambda: tiered(tmp_path)}
    src, dst = make[src_kind](), make[dst_kind]()
    feed(src, [11, 1, 1, 10], torch.Generator().manual_seed(3))
    n = src.seq_len
    dst.begin_import(n)
    for start in range(0, n, 5):  # block-major across layers, as a session load does
        for layer in range(L):
            dst.import_kv(layer, start, src.export_kv(layer, start, min(start + 5, n)))
    dst.finish_import(n)
    for layer in range(L):
        torch.testing.assert_close(dst.export_kv(layer, 0, n), src.export_kv(layer, 0, n), atol=0, rtol=0)
    oa = feed(src, [3, 1], torch.Generator().manual_seed(4))
    ob = feed(dst, [3, 1], torch.Generator().manual_seed(4))
    for x, y in zip(oa, ob):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    src.close(), dst.close()
