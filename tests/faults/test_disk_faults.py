"""Disk-tier faults injected for real: the run directory removed or replaced mid-run, an unusable disk_dir, a full
disk (RLIMIT_FSIZE in a subprocess), a short read (the file truncated) and a flipped byte.

Each ends in one clear TierKVError or carries on with the right tokens; never wrong tokens. We run as root, so
chmod cannot make a directory unwritable (root ignores permission bits, and an open descriptor is never rechecked);
the tests make the directory unusable the ways root cannot ignore: removing it, or putting a file in its place.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import tierkv
from tierkv.errors import IntegrityError, StorageError
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore

CB = 8192  # llama-tiny chunk bytes at chunk_size 32 in fp32
PROMPT = [i % 500 for i in range(400)]  # 12 chunks per layer: 4 on the device, 4 in host memory, the rest on disk
NEW = 40


def tiered(disk_dir) -> tierkv.LLM:
    return tierkv.load("llama-tiny", device="cpu", kv_gpu_budget=12 * CB, cpu_budget=4 * CB, disk_dir=str(disk_dir),
                       sink_tokens=32, window_tokens=32)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The tokens of the all-on-device cache."""
    return list(tierkv.load("llama-tiny", device="cpu").stream_ids(PROMPT, max_new_tokens=NEW))


def run_with_fault(llm, disk_dir, fault, at: int = 10) -> tuple[list[int], Exception | None]:
    """Generate, calling fault(run_dir) after `at` tokens; the tokens got and the error raised (or None)."""
    got = []
    try:
        for i, t in enumerate(llm.stream_ids(PROMPT, max_new_tokens=NEW)):
            got.append(t)
            if i == at:
                (run_dir,) = list(disk_dir.iterdir())
                fault(run_dir)
    except tierkv.TierKVError as e:
        return got, e
    return got, None


@pytest.mark.slow
def test_run_dir_removed_mid_run_keeps_tokens_and_leaves_nothing(tmp_path, reference):
    got, err = run_with_fault(tiered(tmp_path), tmp_path, shutil.rmtree)
    assert err is None and got == reference  # the open file outlives its name: reads and writes go on
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_dir_replaced_by_a_file_keeps_tokens_and_the_file(tmp_path, reference):
    def replace(run_dir):
        shutil.rmtree(run_dir)
        run_dir.write_text("a user's file")

    got, err = run_with_fault(tiered(tmp_path), tmp_path, replace)
    assert err is None and got == reference
    (left,) = list(tmp_path.iterdir())
    assert left.read_text() == "a user's file"  # close() removes only its own run directory


def test_removed_run_dir_still_grows_and_reads_back(tmp_path):
    """Growing the file past its first extent goes through the open descriptor, not the (removed) path."""
    store = DiskStore(1000, tmp_path, backend="posix")
    data = [torch.full((1000,), i % 251, dtype=torch.uint8) for i in range(1100)]
    for i in range(5):
        store.put(ChunkId(0, i), data[i])
    shutil.rmtree(store.run_dir)
    for i in range(5, 1100):  # 1,024 slots are reserved at first: this crosses into a new extent
        store.put(ChunkId(0, i), data[i])
    assert store.file_bytes() >= 4096 * 1101
    out = torch.empty(1000, dtype=torch.uint8)
    for i in (0, 4, 5, 1099):
        store.read_into(ChunkId(0, i), out)
        assert torch.equal(out, data[i])
    store.close()


@pytest.mark.slow
def test_disk_dir_that_is_a_file_is_one_clear_error_and_the_llm_stays_usable(tmp_path, reference):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("keep me")
    llm = tiered(blocker)
    with pytest.raises(StorageError, match="disk_dir") as e:
        list(llm.stream_ids(PROMPT, max_new_tokens=NEW))
    assert str(blocker) in str(e.value) and "\n" not in str(e.value)
    assert blocker.read_text() == "keep me"
    llm.tier = llm.tier.replace(disk_dir=str(tmp_path / "good"))
    assert list(llm.stream_ids(PROMPT, max_new_tokens=NEW)) == reference


@pytest.mark.slow
def test_truncated_file_is_a_short_read_error_and_the_llm_stays_usable(tmp_path, reference):
    llm = tiered(tmp_path)
    got, err = run_with_fault(llm, tmp_path, lambda d: os.truncate(d / "kv.bin", 4096 * 3))
    assert isinstance(err, StorageError) and "short read" in str(err) and "\n" not in str(err)
    assert got == reference[:len(got)] and len(got) == 11  # the step that hit it produced no token
    assert list(tmp_path.iterdir()) == []  # the failed run was closed and removed
    assert list(llm.stream_ids(PROMPT, max_new_tokens=NEW)) == reference


def test_truncated_file_leaves_the_chunks_before_the_cut_readable(tmp_path):
    store = DiskStore(1000, tmp_path, backend="posix")
    data = [torch.full((1000,), 7 * i, dtype=torch.uint8) for i in range(4)]
    for i, d in enumerate(data):
        store.put(ChunkId(0, i), d)
    os.truncate(store.path, store.offset_of(ChunkId(0, 2)) + 500)  # cuts chunk 2 in half
    out = torch.empty(1000, dtype=torch.uint8)
    for i in (0, 1):
        store.read_into(ChunkId(0, i), out)
        assert torch.equal(out, data[i])
    for i in (2, 3):
        with pytest.raises(StorageError, match="short read"):
            store.read_into(ChunkId(0, i), out)
    store.close()


@pytest.mark.slow
def test_flipped_byte_mid_run_is_an_integrity_error_never_wrong_tokens(tmp_path, reference):
    def flip(run_dir):
        with open(run_dir / "kv.bin", "r+b") as f:  # the first slot after the 4 KiB header
            f.seek(4096 + 100)
            b = f.read(1)
            f.seek(4096 + 100)
            f.write(bytes([b[0] ^ 0x01]))

    got, err = run_with_fault(tiered(tmp_path), tmp_path, flip)
    assert isinstance(err, IntegrityError) and "checksum" in str(err)
    assert got == reference[:len(got)]


DISK_FULL_MID_RUN = textwrap.dedent("""
    import json, resource, signal, sys, torch
    from tierkv.config import TierConfig
    from tierkv.errors import StorageError
    from tierkv.kv.caches.dense import DenseKVCache
    from tierkv.kv.caches.tiered import TieredKVCache, TieredOptions
    L, HKV, D, C = 2, 2, 8, 4
    CB = 2 * C * HKV * D * 4
    cfg = TierConfig(kv_gpu_budget=10 * CB, cpu_budget=4 * CB, disk_dir=sys.argv[1], chunk_size=C, sink_tokens=4,
                     window_tokens=4)
    cache = TieredKVCache(L, HKV, D, device="cpu", dtype=torch.float32, config=cfg,
                          options=TieredOptions(batch_tokens=8, io_threads=2))
    dense = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=4)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 * 8, hard))  # header + 7 slots of 4 KiB
    g = torch.Generator().manual_seed(0)
    err = None
    try:
        for step in range(200):
            for layer in range(L):
                k, v, q = (torch.randn(1, h, D, generator=g) for h in (HKV, HKV, 4))
                cache.append(layer, k, v)
                cache.attend(layer, q)
                dense.append(layer, k, v)
            cache.advance(1)
            dense.advance(1)
    except StorageError as e:
        err = str(e)
    full_at = cache.stats()["chunks"]
    n = cache.seq_len
    cache.truncate(n)  # what a chat does after a failed turn: back to the committed tokens
    same_kv = all(torch.equal(cache.export_kv(l, 0, n), dense.export_kv(l, 0, n)) for l in range(L))
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))  # space freed: the same cache carries on
    worst = 0.0
    for step in range(40):  # attention over every committed token, from every tier, equals the dense cache's
        for layer in range(L):
            k, v, q = (torch.randn(1, h, D, generator=g) for h in (HKV, HKV, 4))
            cache.append(layer, k, v)
            dense.append(layer, k, v)
            worst = max(worst, (cache.attend(layer, q) - dense.attend(layer, q)).abs().max().item())
        cache.advance(1)
        dense.advance(1)
    stats = cache.stats()
    cache.close()
    print(json.dumps({"err": err, "tokens": n, "same_kv": same_kv, "worst": worst, "full_at": full_at,
                      "chunks": stats["chunks"]}))
""")


@pytest.mark.slow
def test_disk_full_mid_decode_is_one_error_and_every_committed_token_stays_readable(tmp_path):
    """Extends tests/io/test_disk_store.py's store-level disk-full test to the cache: the chunk that found the disk
    full goes back where it was, so the cache still holds (and attends to) every committed token afterwards."""
    res = subprocess.run([sys.executable, "-c", DISK_FULL_MID_RUN, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["err"] and "full" in r["err"] and str(tmp_path) in r["err"] and "\n" not in r["err"]
    assert r["full_at"]["disk"] == 7  # it filled the disk first, then every chunk went back where it was
    assert r["same_kv"] and r["worst"] < 1e-5 and r["chunks"]["disk"] > 7
    assert list(tmp_path.iterdir()) == []
