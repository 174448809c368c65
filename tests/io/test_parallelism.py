"""The disk's read parallelism is measured on the real disk and sets the disk tier's thread count."""

from __future__ import annotations

import math

import torch

from tierkv.io.parallelism import CANDIDATES, measure_read_parallelism
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore


def test_measurement_picks_a_candidate_and_cleans_up(tmp_path):
    p = measure_read_parallelism(tmp_path, chunk_bytes=16 * 1024, chunks=64)
    assert p.threads in CANDIDATES and set(p.gbps) == set(CANDIDATES)
    assert all(math.isfinite(r) and r > 0 for r in p.gbps.values())
    best = max(p.gbps.values())
    assert p.gbps[p.threads] >= 0.9 * best  # within the tolerance of the fastest
    assert all(p.gbps[t] < 0.9 * best for t in CANDIDATES if t < p.threads)  # and the fewest threads that are
    assert not list(tmp_path.iterdir())


def test_disk_store_uses_the_measured_thread_count(tmp_path):
    store = DiskStore(4096, tmp_path, backend="posix", threads=None)
    try:
        assert store.parallelism is not None and store.threads == store.parallelism.threads
        data = torch.arange(4096, dtype=torch.int32).to(torch.uint8)
        store.put(ChunkId(0, 0), data)
        out = torch.empty(4096, dtype=torch.uint8)
        store.read_into(ChunkId(0, 0), out)
        assert torch.equal(out, data)
    finally:
        store.close()
    fixed = DiskStore(4096, tmp_path, backend="posix", threads=3)
    assert fixed.parallelism is None and fixed.threads == 3
    fixed.close()
