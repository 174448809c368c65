"""TieredKVCache: exact attention equal to DenseKVCache with most chunks on host and disk."""

import random
import sys

import pytest
import torch

from tierkv.config import TierConfig
from tierkv.errors import BudgetError
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions

L, HQ, HKV, D, C = 2, 4, 2, 8, 4
CB = 2 * C * HKV * D * 4  # fp32 chunk bytes = 512


def make(tmp_path, gpu_chunks=10, host_chunks=4, batch_tokens=8, **cfg):
    config = TierConfig(kv_gpu_budget=gpu_chunks * CB, cpu_budget=host_chunks * CB, disk_dir=str(tmp_path),
                        chunk_size=C, sink_tokens=cfg.pop("sink_tokens", 4), window_tokens=cfg.pop("window_tokens", 4),
                        **cfg)
    return TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config,
                         options=TieredOptions(batch_tokens=batch_tokens, io_threads=2))


def run_both(cache, steps, seed=0, check=None):
    """Feed the same random K/V/Q slices to both caches; compare every attention output."""
    g = torch.Generator().manual_seed(seed)
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=4)
    worst = 0.0
    for t in steps:
        for layer in range(L):
            k, v = torch.randn(t, HKV, D, generator=g), torch.randn(t, HKV, D, generator=g)
            q = torch.randn(t, HQ, D, generator=g)
            dense.append(layer, k, v)
            cache.append(layer, k, v, k_pre=k)
            want, got = dense.attend(layer, q), cache.attend(layer, q)
            worst = max(worst, (want - got).abs().max().item())
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        dense.advance(t)
        cache.advance(t)
        if check:
            check(cache)
    return worst


@pytest.mark.parametrize("batch_tokens", [4, 12, 4096])
def test_matches_dense_with_most_chunks_on_host_and_disk(tmp_path, monkeypatch, batch_tokens):
    monkeypatch.setitem(sys.modules, "kvikio", None)  # kvikio absent: the POSIX backend must be named
    rng = random.Random(batch_tokens)
    steps = [7, 1, 13, 1, 1, 5, 9] + [1] * 20 + [rng.randint(1, 11) for _ in range(6)] + [1] * 10
    cache = make(tmp_path, batch_tokens=batch_tokens)
    seen = {}

    def check(c):
        s = c.stats()
        assert s["bytes"]["device"] <= s["budget_bytes"]["device"] and s["bytes"]["host"] <= s["budget_bytes"]["host"]
        assert c.gpu_reserved_bytes <= c.config.kv_gpu_budget
        if s["chunks"]["disk"]:
            seen["disk"] = (s["chunks"]["disk"], s["disk_file_bytes"], c.disk.path.stat().st_size)

    worst = run_both(cache, steps, check=check)
    print(f"max |tiered - dense| = {worst:.2e}")
    s = cache.stats()
    n_chunks = L * (sum(steps) // C)
    assert sum(s["chunks"].values()) == n_chunks
    assert s["chunks"]["disk"] > s["chunks"]["device"] and s["chunks"]["host"] == 4
    assert s["disk_backend"] == "posix" and s["host_memory"] == "pageable" and s["host_read"] == "direct"
    n_disk, file_bytes, st_size = seen["disk"]
    assert n_disk > 0 and file_bytes == st_size >= 4096 + n_disk * 4096  # real bytes in a real file
    tot = s["total"]
    assert tot["bytes_moved"]["device->host"] > 0 and tot["bytes_moved"]["host->disk"] > 0
    assert tot["bytes_moved"]["disk->device"] > 0 and tot["bytes_moved"]["host->device"] > 0
    assert tot["hits"]["disk"] > 0 and abs(sum(tot["hit_rate"].values()) - 1) < 1e-9
    assert tot["steps"] == len(steps) and s["last_step"]["steps"] == 1
    assert s["last_step"]["bytes_moved"]["disk->device"] > 0  # a decode step streams the disk chunks again
    run_dir = cache.disk.run_dir
    assert run_dir.exists()
    cache.close()
    cache.close()
    assert not run_dir.exists()


def test_no_budgets_keeps_everything_on_device_and_makes_no_files(tmp_path):
    config = TierConfig(disk_dir=str(tmp_path), chunk_size=C, sink_tokens=0, window_tokens=0)
    cache = TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=config)
    run_both(cache, [9, 1, 1, 6, 1])
    s = cache.stats()
    assert s["chunks"] == {"device": L * 4, "host": 0, "disk": 0} and s["disk_backend"] == "none"
    assert list(tmp_path.iterdir()) == []
    cache.close()


def test_zero_sinks_and_window_and_zero_host(tmp_path):
    cache = make(tmp_path, gpu_chunks=6, host_chunks=0, sink_tokens=0, window_tokens=0)
    run_both(cache, [5, 1, 1, 17, 1, 1, 3])
    assert cache.stats()["chunks"]["host"] == 0 and cache.stats()["chunks"]["disk"] > 0
    cache.close()


def test_attend_chunks_subset_is_attention_over_those_chunks(tmp_path):
    g = torch.Generator().manual_seed(1)
    cache = make(tmp_path)
    k, v = torch.randn(24, HKV, D, generator=g), torch.randn(24, HKV, D, generator=g)
    for layer in range(L):
        cache.append(layer, k, v)
        cache.attend(layer, torch.randn(24, HQ, D, generator=g))
    cache.advance(24)
    kn, vn, q = torch.randn(1, HKV, D, generator=g), torch.randn(1, HKV, D, generator=g), torch.randn(1, HQ, D)
    cache.append(0, kn, vn)
    picked = [0, 2, 5]
    got = cache.attend_chunks(0, q, picked)
    rows = torch.cat([torch.arange(i * C, (i + 1) * C) for i in picked])
    kk, vv = torch.cat([k[rows], kn]), torch.cat([v[rows], vn])
    want = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    cache.close()


def test_gpu_budget_too_small_is_refused(tmp_path):
    with pytest.raises(BudgetError, match="kv_gpu_budget"):
        make(tmp_path, gpu_chunks=5)


def test_cpu_budget_above_available_memory_is_refused(tmp_path):
    with pytest.raises(BudgetError, match="cpu_budget=.*available"):
        TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32,
                      config=TierConfig(kv_gpu_budget=64 * CB, cpu_budget="1000TiB", chunk_size=C,
                                        sink_tokens=0, window_tokens=0))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("host_read", ["mapped", "copy"])
def test_cuda_matches_dense(tmp_path, host_read):
    config = TierConfig(kv_gpu_budget=10 * CB, cpu_budget=4 * CB, disk_dir=str(tmp_path), chunk_size=C,
                        sink_tokens=4, window_tokens=4)
    cache = TieredKVCache(L, HKV, D, device="cuda", dtype=torch.float32, config=config,
                          options=TieredOptions(batch_tokens=8, host_read=host_read))
    g = torch.Generator().manual_seed(0)
    dense = DenseKVCache(L, HKV, D, device="cuda", dtype=torch.float32)
    for t in [7, 1, 13, 1, 1, 5] + [1] * 10:
        for layer in range(L):
            k, v, q = (torch.randn(t, h, D, generator=g).cuda() for h in (HKV, HKV, HQ))
            dense.append(layer, k, v)
            cache.append(layer, k, v)
            torch.testing.assert_close(cache.attend(layer, q), dense.attend(layer, q), atol=1e-5, rtol=0)
        dense.advance(t)
        cache.advance(t)
    assert cache.stats()["host_read"] == host_read and cache.stats()["host_memory"] == "pinned"
    cache.close()


def test_bf16_runs_and_stays_close_to_dense(tmp_path):
    config = TierConfig(kv_gpu_budget=5 * CB, cpu_budget=2 * CB, disk_dir=str(tmp_path), chunk_size=C,
                        sink_tokens=4, window_tokens=4)
    cache = TieredKVCache(L, HKV, D, device="cpu", dtype=torch.bfloat16, config=config,
                          options=TieredOptions(batch_tokens=8))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(3)
    for t in [9, 1, 1, 14, 1, 1, 1]:
        for layer in range(L):
            k, v, q = (torch.randn(t, h, D, generator=g).bfloat16() for h in (HKV, HKV, HQ))
            dense.append(layer, k.float(), v.float())
            cache.append(layer, k, v)
            got = cache.attend(layer, q)
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), dense.attend(layer, q.float()), atol=2e-2, rtol=2e-2)
        dense.advance(t)
        cache.advance(t)
    assert cache.stats()["chunks"]["disk"] > 0
    cache.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mapped_host_view_reads_in_place():
    from tierkv.kv.storage.host import HostPool, probe_mapped_read

    assert probe_mapped_read(torch.device("cuda"))
    pool = HostPool(256, 8)
    for i in range(4):
        pool.put((0, i), torch.full((256,), i + 1, dtype=torch.uint8))
    view = pool.mapped_view(torch.device("cuda"))
    got = view.index_select(0, torch.tensor([3, 1], device="cuda")).cpu()
    assert torch.equal(got[:, 0], torch.tensor([4, 2], dtype=torch.uint8))


def test_step_stats_difference_keeps_notes_and_subtracts_counters():
    """On CUDA the host tier is read in place and the snapshot carries a "reads" note: advance() diffs snapshots
    every step, and a note must pass through instead of being subtracted."""
    from tierkv.kv.caches.tiered import _diff

    a = {"bytes_moved": {"host->device": 10}, "hits": {"device": 3, "host": 1}, "hit_rate": {}, "io_wait_s": 0.5,
         "steps": 4, "reads": "by GPU gathers"}
    b = {"bytes_moved": {"host->device": 4}, "hits": {"device": 1, "host": 1}, "hit_rate": {}, "io_wait_s": 0.25,
         "steps": 3, "reads": "by GPU gathers"}
    d = _diff(a, b)
    assert d["bytes_moved"] == {"host->device": 6} and d["steps"] == 1 and d["io_wait_s"] == 0.25
    assert d["reads"] == "by GPU gathers" and d["hit_rate"] == {"device": 1.0, "host": 0.0}
