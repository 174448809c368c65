"""The sparse graph cache's disk tier: the oldest chunks on a real disk, host slots caching them (kv/placement/disk.py).
Moving chunks to disk changes no token; misses are read before attention uses them; reads ahead are installed
between steps; a budget too small for the hot chunks is refused."""

import numpy as np
import pytest
import torch

from tierkv.errors import BudgetError
from tierkv.kv.placement.disk import MISS, DiskChunks
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore

from tests.kv.helpers import TIER, new_sparse_cache, filled_decode, greedy, placed_cache, random_8b


def _store(tmp_path, layers=2, n=12, row=16):
    """A DiskStore holding chunks 2..9 of every layer; record bytes = layer*100 + chunk (K half then V half)."""
    store = DiskStore(2 * row, tmp_path, backend="posix", threads=2)
    for layer in range(layers):
        for c in range(2, 10):
            store.put(ChunkId(layer, c), torch.full((2 * row,), layer * 100 + c, dtype=torch.uint8))
    k = np.zeros((layers, n - 8 + 3, row), dtype=np.uint8)  # chunks 0-1, 3 slots, chunks 10-11
    return store, k, k.copy()


def test_disk_rows_serve_misses_from_disk_and_evict_the_least_recently_picked(tmp_path):
    store, k, v = _store(tmp_path)
    chunks = DiskChunks(store, k, v, lo=2, hi=10, slots=3, n_chunks=12, device=torch.device("cpu"), threads=2)
    try:
        rm = chunks.row_map.numpy()
        assert rm[0].tolist() == [0, 1] + [MISS] * 8 + [5, 6]  # hot chunks after the region shift down by 5
        assert chunks.serve(0, np.array([4, 4, 7])) == 2 and chunks.n["missed"] == 3  # entries, chunks
        for c in (4, 7):
            row = rm[0, c]
            assert 2 <= row < 5 and (k[0, row] == c).all() and (v[0, row] == c).all()
        assert (rm[1, 2:10] == MISS).all()  # the other layer's slots are its own
        chunks.step = 5
        chunks.end_step(np.array([7]), np.array([0]))  # 7 picked again: 4 is now the least recently picked
        chunks.ahead.clear()  # (drop the reads ahead that booking issued)
        assert chunks.serve(0, np.array([8, 9])) == 2
        assert rm[0, 4] == MISS and rm[0, 7] >= 0 and rm[0, 8] >= 0 and rm[0, 9] >= 0
        with pytest.raises(RuntimeError, match="picks 4 chunks on disk in layer 0; the host holds 3"):
            chunks.serve(0, np.array([2, 3, 4, 5]))
    finally:
        chunks.close()


def test_reads_ahead_of_picked_neighbours_land_between_steps(tmp_path):
    store, k, v = _store(tmp_path)
    chunks = DiskChunks(store, k, v, lo=2, hi=10, slots=3, n_chunks=12, device=torch.device("cpu"), threads=2)
    try:
        chunks.serve(1, np.array([5]))
        chunks.end_step(np.array([5, 5]), np.array([1, 1]))  # two heads picked chunk 5 of layer 1
        assert set(chunks.ahead) == {(1, 4), (1, 6)} and chunks.n["ahead_issued"] == 2
        for f in chunks.ahead.values():
            f.result()
        chunks.begin_step()
        rm = chunks.row_map.numpy()
        assert not chunks.ahead and chunks.n["ahead_installed"] == 2 and rm[1, 5] >= 0
        assert (k[1, rm[1, 4]] == 104).all() and (v[1, rm[1, 6]] == 106).all()
        assert not chunks.missing(np.array([4, 6]), np.array([1, 1]))
        assert chunks.missing(np.array([4, 8]), np.array([1, 1]))
        chunks.end_step(np.array([6]), np.array([1]))
        assert chunks.n["ahead_used"] == 1
    finally:
        chunks.close()


@pytest.mark.parametrize("place", ["host", "all"])
def test_moving_the_oldest_chunks_to_disk_changes_no_token(smol, text_ids, tmp_path, place):
    """place="all": values of every chunk resident on the compute device too; the copies shrink to the chunks
    after the disk region."""
    model, ids, n = smol.model, text_ids[:3000], 16
    ref = new_sparse_cache(model, TIER, len(ids) + n + 1)
    probe = new_sparse_cache(model, TIER, len(ids) + n + 1)
    per_chunk = probe.host_bytes // probe.n_chunks
    budget = probe.host_bytes - 20 * per_chunk  # 20 chunks short: those plus the host slots go to disk
    probe.close()
    cache = placed_cache(model, TIER.replace(cpu_budget=budget, disk_dir=str(tmp_path)), len(ids) + n + 1, place)
    try:
        want = greedy(model, ref, ids, n)
        assert greedy(model, cache, ids, n) == want
        for a, b in zip(ref.index, cache.index):  # the score index is by position, whatever the pool's rows
            assert torch.equal(a.coeffs[:, :ref.seq_len], b.coeffs[:, :ref.seq_len])
        assert cache.res.start == (cache.disk_chunks.hi if place == "all" else cache.n_chunks)
        st = cache.stats()
        disk = st["disk_tier"]
        assert cache.host_bytes <= budget and disk["host_slots_per_layer"] == 2 * cache.hkv * cache.max_picks
        assert disk["chunks"] == (20 + disk["host_slots_per_layer"]) * cache.num_layers
        assert disk["picks"] > 0 and disk["missed"] > 0 and disk["disk_reads"] > 0
        hits = st["total"]["hits"]
        assert hits["disk"] == disk["missed"] and st["total"]["bytes_moved"]["disk->host"] > 0
        assert sum(hits.values()) == ref.stats()["total"]["hits"]["host"]  # every pick served, once
        assert (hits["gpu_resident"] > 0) == (place == "all")
        run_dir = cache.disk_chunks.store.run_dir  # (prompt tokens after the spill: tests/chat/test_sparse_session.py)
    finally:
        ref.close()
        cache.close()
    assert not run_dir.exists()  # the disk files go with the cache


def test_a_cpu_budget_too_small_for_the_hot_chunks_is_refused_before_anything_moves(smol, text_ids, tmp_path):
    model, ids = smol.model, text_ids[:3000]
    tier = TIER.replace(disk_dir=str(tmp_path))
    with pytest.raises(BudgetError, match="cpu_budget=1.00 MiB is below the .* of host memory the sparse cache needs "
                                          "at least"):
        new_sparse_cache(model, tier.replace(cpu_budget=1024**2), len(ids) + 4)
    probe = new_sparse_cache(model, TIER, len(ids) + 320)
    least = probe._min_disk_host()
    probe.close()
    # enough for sinks, window and slots, but not for the 320 positions reserved past the prompt as well
    cache = new_sparse_cache(model, tier.replace(cpu_budget=least), len(ids) + 320)
    try:
        with pytest.raises(BudgetError, match="is below the .* of host memory the sparse cache needs for 3328 tokens "
                                              "with the rest on disk; raise cpu_budget"):
            greedy(model, cache, ids, 3)
        assert cache.disk_chunks is None and not list(tmp_path.iterdir())  # nothing written, the pool untouched
    finally:
        cache.close()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_replay_with_chunks_on_disk_gives_the_eager_tokens_on_cuda(smol_folder, text_ids, tmp_path, dtype):
    """Replays that miss a chunk on disk read it and are replayed again (or run eagerly); the tokens equal the
    eager run's and the run without a disk tier."""
    import tierkv
    from tierkv.graph import GraphStep

    llm = tierkv.load(str(smol_folder), device="cuda", dtype=dtype)
    model, ids, n = llm.model, text_ids[:3000], 64
    probe = new_sparse_cache(model, TIER, len(ids) + n + 1)
    budget = probe.host_bytes - 20 * probe.host_bytes // probe.n_chunks
    probe.close()
    tier = TIER.replace(cpu_budget=budget, disk_dir=str(tmp_path))
    runs, stats = [], []
    for kind in ("none", "eager", "graph"):
        cache = new_sparse_cache(model, TIER if kind == "none" else tier, len(ids) + n + 1)
        step = GraphStep(model, cache) if kind == "graph" else None
        runs.append(greedy(model, cache, ids, n, step))
        stats.append(cache.stats())
        cache.close()
    assert runs[1] == runs[0] and runs[2] == runs[0]
    disk = stats[2]["disk_tier"]
    assert step.replays > 40 and disk["picks"] > 0 and stats[2]["total"]["hits"]["disk"] == disk["missed"]
    # every redone replay was retried (after reading its misses) or run eagerly
    assert step.replays + step.eager_steps >= (n - 1) + disk["steps_redone"]


@pytest.mark.cuda
def test_graph_replay_with_chunks_on_disk_gives_the_eager_tokens_on_a_random_8b_shape(tmp_path):
    """Llama-3.1-8B shape, random bf16 weights, 8K synthetic tokens; 64 chunks past what cpu_budget holds, and
    the host slots, on disk. Random weights pick chunks evenly, so most replays miss and are redone."""
    from tierkv.config import TierConfig

    model = random_8b()
    tier = TierConfig(attention="sparse", token_budget=256)  # 8 picks per head: 128 host slots per layer
    probe = placed_cache(model, tier, 8192 + 80, "host")
    tier = tier.replace(cpu_budget=probe.host_bytes - 64 * probe.host_bytes // probe.n_chunks, disk_dir=str(tmp_path))
    probe.close()
    runs, disk = [], None
    for graphed in (False, True):
        cache = placed_cache(model, tier, 8192 + 80, "host")
        tokens, step = filled_decode(model, cache, graphed)
        runs.append(tokens)
        disk = cache.stats()["disk_tier"]
        cache.close()
    assert disk["picks"] > 0 and disk["missed"] > 0 and step.replays >= 60
    assert runs[0] == runs[1]
