"""Session directories: a chat's manifest, token ids and K/V of every tier, written atomically with checksums.

Format 2: `session.json` (self-checksummed manifest), `tokens.bin` (int32 LE), `kv/layer_NNN.bin` (blocks of
`block_tokens` positions, each (2, T, Hkv, D) K then V in the KV dtype, one CRC-32 per block) and optionally
`extra.safetensors` (a cache subclass's `extra_state`: the sparse cache's shadows, score index and unfolded
pre-RoPE keys). A save fills a sibling temp dir, then swaps it in.

A layer file holds positions [start, num_tokens) (its manifest entry's "start"): 0 for a full-attention layer, the
oldest position its ring keeps for a sliding-window layer (kv/caches/window_split.py), whose earlier positions are never
attended again. Blocks stay aligned to multiples of block_tokens; a layer's first block is cut at its start.
Format 1 (every layer from 0, no "start") is read as well.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from tierkv.config import TierConfig
from tierkv.errors import IntegrityError, StorageError, TierKVError
from tierkv.io.atomic import crc32, fsync_dir
from tierkv.io.dirswap import swap_in, recover
from tierkv.kv.caches.base import KVCache

FORMAT = "tierkv-session"
SESSION_VERSION = 2
READABLE_VERSIONS = (1, 2)  # format 1: every layer from position 0
MANIFEST = "session.json"
BLOCK_TOKENS = 1024
SESSION_ENTRIES = frozenset({MANIFEST, "tokens.bin", "kv", "extra.safetensors"})  # all a save writes


class SessionError(TierKVError):
    """A session directory that is missing or of an unknown format."""


class SessionMismatchError(SessionError):
    """A session saved with another model or incompatible settings."""


class SessionDamagedError(IntegrityError):
    """A session file that fails its checksum or cannot be parsed."""


class SessionSaveError(StorageError):
    """Writing a session failed (read-only or full disk, missing parent); the session in memory is unchanged."""


# ---- identity -------------------------------------------------------------------------------------
def model_identity(llm) -> dict:
    """What must match for a session to load: model shape, a weight fingerprint and the chat template."""
    cfg = dataclasses.asdict(llm.cfg)
    name = cfg.pop("name") or llm.source
    template = getattr(llm.tokenizer, "chat_template", None) or ""
    outer = [llm.model.embed_tokens[:4], llm.model.lm_head[-4:]]
    inner = [llm.model.layers[0].qkv_proj[:4], llm.model.layers[-1].down_proj[:4]]
    # the layer rows are unread (meta) when those layers' weights stay on disk (weights offload): then only the
    # embedding and lm_head rows, which always load, identify the weights
    full = None if any(t.is_meta for t in inner) else f"{_rows_crc(outer + inner):08x}"
    return {"name": name, "source": llm.source, "config": json.loads(json.dumps(cfg)), "fingerprint": full,
            "outer_fingerprint": f"{_rows_crc(outer):08x}", "chat_template_crc32": f"{crc32(template.encode()):08x}"}


def _rows_crc(rows: list[torch.Tensor]) -> int:
    """CRC-32 of a few weight rows, rounded to bf16 so fp32 and bf16 loads agree."""
    acc = 0
    for t in rows:
        acc = crc32(np.ascontiguousarray(t.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy())) ^ (acc * 31)
        acc &= 0xFFFFFFFF
    return acc


def _same_weights(mine: dict, theirs: dict) -> bool:
    """Whether two identities name the same weights, by the finest fingerprint both have (a session saved before
    outer_fingerprint existed, loaded where the layer rows are on disk, has none in common: trusted on its shape)."""
    if mine["fingerprint"] and theirs.get("fingerprint"):
        return mine["fingerprint"] == theirs["fingerprint"]
    if theirs.get("outer_fingerprint"):
        return mine["outer_fingerprint"] == theirs["outer_fingerprint"]
    return True


def check_compatible(path: Path, saved: dict, llm) -> None:
    """Raise SessionMismatchError when the session at path cannot run on llm (model, dtype or attention)."""
    mine, theirs = model_identity(llm), saved["model"]
    for key in ("config", "fingerprint", "chat_template_crc32"):
        if (mine[key] != theirs[key]) if key != "fingerprint" else not _same_weights(mine, theirs):
            what = {"config": "shape", "fingerprint": "weights", "chat_template_crc32": "chat template"}[key]
            raise SessionMismatchError(
                f"session {path} was made with model {theirs['name']!r} but this LLM is {mine['name']!r} (their "
                f"{what} differ); load the session with the model it was saved with")
    dtype = str(llm.dtype).removeprefix("torch.")
    if saved["kv"]["dtype"] != dtype:
        raise SessionMismatchError(f"session {path} holds {saved['kv']['dtype']} K/V but this LLM runs {dtype}; "
                                   f"load the model with dtype={saved['kv']['dtype']}")
    if saved["attention"] != llm.tier.attention:
        raise SessionMismatchError(f"session {path} was saved with attention={saved['attention']!r} but this LLM "
                                   f"uses {llm.tier.attention!r}; load the model with attention={saved['attention']!r}")
    if saved["attention"] == "sparse":  # shadows are laid out per chunk at the saved rank
        # sessions older than score_rank: its default
        was = {k: saved["tier"].get(k, getattr(TierConfig(), k)) for k in ("chunk_size", "rank", "score_rank")}
        differ = {k: v for k, v in was.items() if v != getattr(llm.tier, k)}
        if differ:
            now = _fields({k: getattr(llm.tier, k) for k in differ})
            raise SessionMismatchError(f"session {path} was saved with {_fields(differ)} but this LLM uses {now} "
                                       f"(the sparse shadows depend on them); load the model with {_fields(differ)}")


def _fields(values: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


# ---- writing --------------------------------------------------------------------------------------
def save_session(path: str | os.PathLike, body: dict, ids: Sequence[int], cache: KVCache,
                 block_tokens: int = BLOCK_TOKENS) -> dict:
    """Write a session directory at path, replacing an earlier save only once the new one is complete.

    body: JSON-able manifest fields (model, messages, ...); ids: the cached token ids (len == cache.seq_len).
    Blocks on disk writes and fsyncs; does not mutate the cache. Returns {"bytes", "seconds", "swap"}.
    """
    dest = Path(path).absolute()
    if len(ids) != cache.seq_len:
        raise RuntimeError(f"{len(ids)} token ids for a cache of {cache.seq_len} positions")
    try:
        return _save(dest, body, ids, cache, block_tokens)
    except OSError as e:  # a read-only or full disk, a missing parent: the session in memory stays as it was
        why = e.strerror or str(e)
        where = f" at {e.filename}" if e.filename and str(e.filename) != str(dest) else ""
        raise SessionSaveError(f"cannot save the session to {dest} ({why}{where}); choose a writable directory "
                               f"with free space") from None


def _save(dest: Path, body: dict, ids: Sequence[int], cache: KVCache, block_tokens: int) -> dict:
    t0 = time.perf_counter()
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover(dest)
    check_destination(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{time.time_ns() % 10**9}")
    tmp.mkdir()
    try:
        files = {"tokens": _write_file(tmp / "tokens.bin", np.asarray(ids, dtype="<i4").tobytes())}
        kv = _write_kv(tmp, cache, block_tokens)
        extra = cache.extra_state()
        if extra:
            from safetensors.torch import save as st_save

            blob = st_save({k: v.detach().contiguous().cpu() for k, v in extra.items()})
            files["extra"] = _write_file(tmp / "extra.safetensors", blob)
        body = {**body, "num_tokens": len(ids), "kv": kv, "files": files}
        nbytes = sum(f["bytes"] for f in files.values()) + sum(f["bytes"] for f in kv["files"])
        _write_file(tmp / MANIFEST, _manifest_bytes(body))
        fsync_dir(tmp)
        fsync_dir(tmp / "kv")
        mode = swap_in(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bytes": nbytes, "seconds": time.perf_counter() - t0, "swap": mode}


def check_destination(dest: Path) -> None:
    """Refuse (SessionError, nothing touched) a save target that is not new, empty or an earlier tierkv session.

    A save replaces its target whole, so anything else there (a user's files, a regular file) would be lost.
    """
    if dest.is_symlink():
        raise SessionError(f"cannot save the session to {dest}: it is a symbolic link; give the real directory")
    if not dest.exists():
        return
    if not dest.is_dir():
        raise SessionError(f"cannot save the session to {dest}: it is a file, not a directory; choose a new or "
                           f"empty directory (the file was left as it is)")
    entries = {e.name for e in dest.iterdir()}
    if not entries:
        return
    foreign = sorted(entries - SESSION_ENTRIES)
    if foreign or not _holds_manifest(dest):
        what = f"{foreign[0]!r} and {len(foreign) - 1} more" if len(foreign) > 1 else repr((foreign or [MANIFEST])[0])
        raise SessionError(f"cannot save the session to {dest}: it holds files that are not a tierkv session "
                           f"({what}); choose a new or empty directory (nothing was changed)")


def _holds_manifest(root: Path) -> bool:
    """Whether root/session.json is a tierkv session manifest (its checksum is not checked: a damaged session may
    be overwritten by a good one)."""
    try:
        return json.loads((root / MANIFEST).read_bytes()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _write_file(path: Path, data: bytes | memoryview) -> dict:
    """Write one file and fsync it. Returns its {"path", "bytes", "crc32"} entry."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"path": path.name, "bytes": len(memoryview(data).cast("B")), "crc32": crc32(data)}


def _write_kv(root: Path, cache: KVCache, block_tokens: int) -> dict:
    """One file per layer of (2, T, Hkv, D) blocks gathered from every tier, from the layer's export_start; per-block
    CRC-32s."""
    (root / "kv").mkdir()
    n, files, shape = cache.seq_len, [], None
    for layer in range(cache.num_layers):
        name, crcs, size, first = f"kv/layer_{layer:03d}.bin", [], 0, min(cache.export_start(layer), n)
        with open(root / name, "wb") as f:
            for start in range(first - first % block_tokens, n, block_tokens):
                kv = cache.export_kv(layer, max(start, first), min(start + block_tokens, n), device="cpu").contiguous()
                shape, dtype = kv.shape[2:], kv.dtype
                raw = kv.view(torch.uint8).numpy()
                f.write(raw.data)
                crcs.append(crc32(raw))
                size += raw.nbytes
            f.flush()
            os.fsync(f.fileno())
        files.append({"path": name, "start": first, "bytes": size, "block_crc32": crcs})
    kv_dtype = str(cache.dtype if shape is None else dtype).removeprefix("torch.")
    return {"block_tokens": block_tokens, "num_layers": cache.num_layers, "dtype": kv_dtype,
            "heads_dim": list(shape) if shape is not None else None, "files": files}


def _manifest_bytes(body: dict) -> bytes:
    return json.dumps({"format": FORMAT, "format_version": SESSION_VERSION, "crc32": _body_crc(body),
                       "body": body}, indent=1).encode()


def _body_crc(body: dict) -> int:
    return crc32(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


# ---- reading --------------------------------------------------------------------------------------
def read_manifest(path: str | os.PathLike) -> dict:
    """The verified manifest body of the session at path (finishing an interrupted swap first). Does not load KV."""
    root = Path(path).absolute()
    recover(root)
    file = root / MANIFEST
    if not file.is_file():
        raise SessionError(f"no tierkv session at {root} ({MANIFEST} is missing); give a directory written by "
                           f"chat.save()")
    try:
        doc = json.loads(file.read_bytes())
        body, fmt, version, crc = doc["body"], doc["format"], doc["format_version"], doc["crc32"]
    except (ValueError, KeyError, TypeError) as e:
        raise SessionDamagedError(f"session file {file} is damaged ({e.__class__.__name__}); save the session "
                                  f"again or delete {root}") from None
    if fmt != FORMAT or version not in READABLE_VERSIONS:
        raise SessionError(f"session {root} has format {fmt!r} version {version}; this tierkv reads {FORMAT!r} "
                           f"version {SESSION_VERSION}: save it again with this version")
    if _body_crc(body) != crc:
        raise SessionDamagedError(f"session file {file} failed its checksum; save the session again or delete {root}")
    return body


def read_file(root: Path, entry: dict) -> bytes:
    """A whole small file of the session, checked against its manifest entry."""
    file = root / entry["path"]
    try:
        data = file.read_bytes()
    except OSError as e:
        raise SessionDamagedError(f"session file {file} cannot be read ({e.strerror}); save the session again") from None
    if len(data) != entry["bytes"] or crc32(data) != entry["crc32"]:
        raise SessionDamagedError(f"session file {file} failed its checksum; save the session again or delete {root}")
    return data


def read_tokens(path: str | os.PathLike, body: dict) -> list[int]:
    """The saved token ids, verified."""
    return np.frombuffer(read_file(Path(path).absolute(), body["files"]["tokens"]), dtype="<i4").tolist()


def restore_kv(path: str | os.PathLike, body: dict, cache: KVCache) -> int:
    """Fill an empty cache with the saved K/V, block by block across layers (as prefill would). Mutates cache;
    blocks on reads; verifies every block. Returns the bytes read."""
    root, kv = Path(path).absolute(), body["kv"]
    n, bt = body["num_tokens"], kv["block_tokens"]
    if kv["num_layers"] != cache.num_layers:
        raise SessionMismatchError(f"session {root} has {kv['num_layers']} layers but the model has {cache.num_layers}")
    dtype = getattr(torch, kv["dtype"])
    heads_dim = kv["heads_dim"] or [0, 0]
    token_bytes = 2 * heads_dim[0] * heads_dim[1] * torch.empty((), dtype=dtype).element_size()
    handles, firsts = [], []
    try:
        for entry in kv["files"]:
            file = root / entry["path"]
            if not file.is_file() or file.stat().st_size != entry["bytes"]:
                raise SessionDamagedError(f"session file {file} is missing or has the wrong size; save the session again")
            handles.append(open(file, "rb"))
        firsts = _layer_starts(root, kv["files"], cache, n)
        cache.begin_import(n)
        for start in range(0, n, bt):
            for layer, f in enumerate(handles):
                first, end = max(start, firsts[layer]), min(n, start + bt)
                if first >= end:
                    continue
                b = start // bt - firsts[layer] // bt  # the layer's blocks begin at the one holding its start
                buf = bytearray((end - first) * token_bytes)
                f.seek((first - firsts[layer]) * token_bytes)
                f.readinto(buf)
                if crc32(buf) != kv["files"][layer]["block_crc32"][b]:
                    raise SessionDamagedError(
                        f"session file {root / kv['files'][layer]['path']} failed its checksum at block {b} (positions "
                        f"{first}..{end}); save the session again or delete {root}")
                cache.import_kv(layer, first, torch.frombuffer(buf, dtype=dtype).view(2, end - first, *heads_dim))
        cache.finish_import(n)
    finally:
        for f in handles:
            f.close()
    if "extra" in body["files"]:
        cache.load_extra_state(read_tensors(root, body["files"]["extra"]))
    return sum(n - first for first in firsts) * token_bytes


def _layer_starts(root: Path, files: list[dict], cache: KVCache, n: int) -> list[int]:
    """Each layer file's first position, checked against what the cache needs (a sliding-window ring saved its
    newest positions only: a cache that attends further back cannot take them)."""
    firsts = [int(entry.get("start", 0)) for entry in files]
    for layer, first in enumerate(firsts):
        need = cache.import_start(layer, n)
        if first > need:
            raise SessionMismatchError(
                f"session {root} keeps layer {layer}'s K/V from position {first} only (a sliding-window ring) but this "
                f"cache ({cache.kind}) reads it from {need}; load it with the kv settings it was saved with")
    return firsts


def read_tensors(root: Path, entry: dict) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file of the session (checked against its manifest entry). safetensors holds
    only a JSON header and raw bytes: anything else (a pickle, say) is refused as damaged and never executed."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    file = root / entry["path"]
    try:
        return st_load(read_file(root, entry))
    except (SafetensorError, ValueError) as e:
        raise SessionDamagedError(f"session file {file} is not a safetensors file ({str(e)[:80]}); save the session "
                                  f"again or delete {root}") from None
