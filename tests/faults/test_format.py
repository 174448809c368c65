"""Stored formats: a session from another format version is refused, and nothing tierkv stores is read with pickle.

The sessions here are written by the real save path (save_session) from a real cache and read by the real load
path (read_manifest, restore_kv: what Chat.load calls), so no model is needed.
"""

import json
import pickle
import re
from pathlib import Path

import pytest
import torch

import tierkv
from tierkv.io.atomic import crc32
from tierkv.kv.caches.dense import DenseKVCache
from tierkv.session import MANIFEST, SessionDamagedError, SessionError, read_manifest, restore_kv, save_session

L, HKV, D = 2, 2, 8


def saved_session(path: Path, n: int = 40) -> dict:
    cache = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=n)
    g = torch.Generator().manual_seed(0)
    for layer in range(L):
        cache.append(layer, torch.randn(n, HKV, D, generator=g), torch.randn(n, HKV, D, generator=g))
    cache.advance(n)
    save_session(path, {"model": {"name": "test"}, "messages": []}, list(range(n)), cache)
    return json.loads((path / MANIFEST).read_bytes())


def rewrite_manifest(path: Path, doc: dict) -> None:
    """Write the manifest back with its checksum recomputed, so only the edit itself can be refused."""
    doc["crc32"] = crc32(json.dumps(doc["body"], sort_keys=True, separators=(",", ":")).encode())
    (path / MANIFEST).write_text(json.dumps(doc))


def snapshot(path: Path) -> dict:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()}


def test_a_format_1_session_still_loads(tmp_path):
    """Format 1 (no per-layer "start": every layer from position 0) reads as before."""
    doc = saved_session(tmp_path / "s")
    doc["format_version"] = 1
    for entry in doc["body"]["kv"]["files"]:
        assert entry.pop("start") == 0
    rewrite_manifest(tmp_path / "s", doc)
    body = read_manifest(tmp_path / "s")
    cache = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=8)
    restore_kv(tmp_path / "s", body, cache)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(cache.export_kv(0, 0, 40)[0], torch.randn(40, HKV, D, generator=g))


@pytest.mark.parametrize("version", [0, 3])
def test_another_format_version_is_refused_and_left_as_it_is(tmp_path, version):
    doc = saved_session(tmp_path / "s")
    assert doc["format"] == "tierkv-session" and doc["format_version"] == 2  # the version is stored
    doc["format_version"] = version
    rewrite_manifest(tmp_path / "s", doc)
    before = snapshot(tmp_path / "s")
    with pytest.raises(SessionError, match=f"version {version}; this tierkv reads 'tierkv-session' version 2") as e:
        read_manifest(tmp_path / "s")
    assert "\n" not in str(e.value) and not isinstance(e.value, SessionDamagedError)
    assert snapshot(tmp_path / "s") == before


def test_a_pickle_in_place_of_safetensors_is_refused_and_never_run(tmp_path):
    """A session whose tensor file is a pickle (manifest checksums made to match it) is refused as damaged; the
    pickle's payload, which would create a file when unpickled, never runs."""
    path, marker = tmp_path / "s", tmp_path / "pickle-ran"
    doc = saved_session(path)

    class Payload:
        def __reduce__(self):
            return Path.touch, (marker,)

    blob = pickle.dumps(Payload())
    (path / "extra.safetensors").write_bytes(blob)
    doc["body"]["files"]["extra"] = {"path": "extra.safetensors", "bytes": len(blob), "crc32": crc32(blob)}
    rewrite_manifest(path, doc)
    body = read_manifest(path)  # the manifest itself is fine
    cache = DenseKVCache(L, HKV, D, device="cpu", dtype=torch.float32, capacity=64)
    with pytest.raises(SessionDamagedError, match="not a safetensors file") as e:
        restore_kv(path, body, cache)
    assert str(path / "extra.safetensors") in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


UNSAFE = [
    (re.compile(r"\b(import|from)\s+(pickle|cPickle|dill|joblib|shelve|marshal)\b"), "a pickle-family module"),
    (re.compile(r"torch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"allow_pickle\s*=\s*True"), "numpy with allow_pickle=True"),
]


def test_the_package_source_reads_nothing_with_pickle():
    """A guard over every module of the package: the stored formats (sessions, disk-tier chunks, GGUF conversions)
    are raw bytes, JSON and safetensors, and must stay that way."""
    root = Path(tierkv.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 50  # the scan sees the whole package
    found = [f"{f.relative_to(root)}: {why}" for f in files for pattern, why in UNSAFE
             if pattern.search(f.read_text())]
    assert found == []
