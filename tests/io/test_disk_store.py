"""Disk tier: POSIX round-trip, checksums, disk-full behaviour, cleanup, backend choice."""

import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

from tierkv.errors import ConfigError, IntegrityError
from tierkv.io.atomic import atomic_write, crc32
from tierkv.io.disk import choose_backend
from tierkv.kv.storage.layout import ChunkId
from tierkv.kv.storage.disk import DiskStore

CB = 1000  # deliberately not a multiple of the 4 KiB slot alignment


def chunk_bytes(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (CB,), dtype=torch.uint8, generator=g)


def test_posix_round_trip_and_cleanup(tmp_path):
    store = DiskStore(CB, tmp_path, backend="posix")
    assert store.backend_name == "posix"
    for i in range(5):
        store.put(ChunkId(0, i), chunk_bytes(i))
    store.evict(ChunkId(0, 1))
    store.put(ChunkId(1, 0), chunk_bytes(99))  # reuses the freed slot
    out = torch.empty(CB, dtype=torch.uint8)
    for c, seed in [(ChunkId(0, 0), 0), (ChunkId(0, 4), 4), (ChunkId(1, 0), 99)]:
        store.read_into(c, out)
        assert torch.equal(out, chunk_bytes(seed))
    assert store.nbytes == 5 * CB and store.file_bytes() >= 4096 + 5 * 4096
    assert store.offset_of(ChunkId(0, 0)) % 4096 == 0
    run_dir = store.run_dir
    assert run_dir.parent == tmp_path and store.path.exists()
    store.close()
    store.close()
    assert not run_dir.exists()


def test_keep_writes_a_checksum_index(tmp_path):
    store = DiskStore(CB, tmp_path, backend="posix", keep=True)
    store.put(ChunkId(2, 3), chunk_bytes(7))
    store.close()
    index = json.loads((store.run_dir / "index.json").read_text())
    assert index["format_version"] == 1 and index["chunk_bytes"] == CB
    assert index["chunks"] == [[2, 3, 0, crc32(chunk_bytes(7).numpy())]]
    assert store.path.exists()


def test_flipped_byte_raises_integrity_error_naming_the_file(tmp_path):
    store = DiskStore(CB, tmp_path, backend="posix")
    store.put(ChunkId(0, 0), chunk_bytes(0))
    store.put(ChunkId(0, 1), chunk_bytes(1))
    off = store.offset_of(ChunkId(0, 1)) + 17
    with open(store.path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0x40]))
    out = torch.empty(CB, dtype=torch.uint8)
    with pytest.raises(IntegrityError, match=str(store.path)) as e:
        store.read_into(ChunkId(0, 1), out)
    assert "index 1" in str(e.value) and "\n" not in str(e.value)
    store.read_into(ChunkId(0, 0), out)  # its neighbour is fine
    assert torch.equal(out, chunk_bytes(0))
    store.close()


DISK_FULL = textwrap.dedent("""
    import json, resource, signal, sys, torch
    from tierkv.errors import StorageError
    from tierkv.kv.storage.layout import ChunkId
    from tierkv.kv.storage.disk import DiskStore
    store = DiskStore(1000, sys.argv[1], backend="posix")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096 * 4, 4096 * 4))  # header + 3 slots
    data = [torch.full((1000,), i, dtype=torch.uint8) for i in range(10)]
    written, err = 0, None
    try:
        for i in range(10):
            store.put(ChunkId(0, i), data[i])
            written += 1
    except StorageError as e:
        err = str(e)
    out = torch.empty(1000, dtype=torch.uint8)
    ok = []
    for i in range(written):
        store.read_into(ChunkId(0, i), out)
        ok.append(bool(torch.equal(out, data[i])))
    print(json.dumps({"written": written, "err": err, "ok": ok, "path": str(store.path)}))
""")


@pytest.mark.slow
def test_disk_full_gives_clear_error_and_keeps_earlier_chunks(tmp_path):
    res = subprocess.run([sys.executable, "-c", DISK_FULL, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["written"] == 3 and r["ok"] == [True] * 3
    assert "full" in r["err"] and r["path"] in r["err"] and "\n" not in r["err"]


def test_atomic_write_replaces_whole_file(tmp_path):
    p = tmp_path / "x.json"
    atomic_write(p, b"one")
    atomic_write(p, b"two")
    assert p.read_bytes() == b"two" and [q.name for q in tmp_path.iterdir()] == ["x.json"]


def test_kvikio_absent_uses_posix(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "kvikio", None)  # import kvikio -> ImportError
    choice, mod = choose_backend(tmp_path, "auto")
    assert choice.name == "posix" and mod is None and "not importable" in choice.reason
    with pytest.raises(ConfigError, match="posix"):
        choose_backend(tmp_path, "kvikio")


class _Future:
    def __init__(self, n):
        self.n = n

    def get(self):
        return self.n


def fake_kvikio(works: bool, compat: bool = True):
    """A stand-in kvikio: CuFile over plain files, or failing like kvikio without libcuda.so.1."""
    mod = types.ModuleType("kvikio")
    settings = {"num_threads": 1}

    class CuFile:
        def __init__(self, path, flags):
            if not works:
                raise RuntimeError("KvikIO failure at: utils.cpp:21: libcuda.so.1: cannot open shared object file")
            self.f = open(path, "r+b")

        def pwrite(self, buf, n, off):
            self.f.seek(off)
            self.f.write(memoryview(buf).cast("B")[:n])
            self.f.flush()
            return _Future(n)

        def pread(self, buf, n, off):
            self.f.seek(off)
            return _Future(self.f.readinto(memoryview(buf).cast("B")[:n]))

        def close(self):
            self.f.close()

    defaults = types.ModuleType("kvikio.defaults")
    defaults.set = lambda k, v: settings.__setitem__(k, v)
    defaults.get = settings.get
    defaults.is_compat_mode_preferred = lambda: compat
    mod.CuFile, mod.defaults, mod.settings = CuFile, defaults, settings
    return mod, defaults


@pytest.mark.parametrize("works", [False, True])
def test_kvikio_probe(tmp_path, monkeypatch, works):
    mod, defaults = fake_kvikio(works)
    monkeypatch.setitem(sys.modules, "kvikio", mod)
    monkeypatch.setitem(sys.modules, "kvikio.defaults", defaults)
    choice, _ = choose_backend(tmp_path, "auto", threads=6)
    if not works:
        assert choice.name == "posix" and "libcuda.so.1" in choice.reason
        return
    assert choice.name == "kvikio-compat" and choice.threads == 6 and mod.settings["num_threads"] == 6
    store = DiskStore(CB, tmp_path, backend="kvikio", threads=6)
    assert store.backend_name == "kvikio-compat"
    store.put(ChunkId(0, 0), chunk_bytes(3))
    out = np.empty(CB, dtype=np.uint8)
    store.read_into(ChunkId(0, 0), out)
    assert np.array_equal(out, chunk_bytes(3).numpy())
    store.close()
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        choose_backend(tmp_path, "nfs")
