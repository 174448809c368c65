"""The tiered cache under tiny budgets gives the all-on-device cache's logits and greedy tokens on SmolLM2."""

from __future__ import annotations

import torch

import tierkv


def test_tiered_smollm2_matches_dense(smol_folder, text_ids, tmp_path):
    prompt = text_ids[:3072]
    dense = tierkv.load(str(smol_folder), device="cpu", dtype="fp32")
    ref_tokens = list(dense.stream_ids(prompt, max_new_tokens=64))
    # 3K tokens x 30 layers x 48 KiB per chunk of 32 tokens: about 140 MiB of KV. Keep ~20% on the device,
    # ~20% in host memory and the rest on disk.
    tiered = tierkv.load(str(smol_folder), device="cpu", dtype="fp32", kv_gpu_budget="30MiB", cpu_budget="28MiB",
                         disk_dir=str(tmp_path), sink_tokens=32, window_tokens=64)
    seen = {}
    stream = tiered.stream_ids(prompt, max_new_tokens=64)
    tokens = [next(stream)]
    cache = tiered.newest_cache
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    seen["disk_files"] = sum(p.stat().st_size for p in files)
    seen["disk_chunks"] = cache.stats()["chunks"]["disk"]
    tokens += list(stream)
    assert tokens == ref_tokens
    kv = tiered.stats["kv"]
    assert seen["disk_chunks"] > kv["chunks"]["device"] and seen["disk_files"] >= seen["disk_chunks"] * kv["chunk_bytes"]
    assert kv["chunks"]["host"] > 0
    assert kv["total"]["bytes_moved"]["disk->device"] + kv["total"]["bytes_moved"]["disk->host"] > 0
    assert kv["disk_backend"] == "posix"
    assert kv["disk_threads"] in (1, 4, 16) and set(kv["disk_parallelism_gbps"]) == {1, 4, 16}  # measured there
    assert not any(p.is_file() for p in tmp_path.rglob("*")), "run files are removed when the cache closes"


def test_tiered_logits_match_dense(smol, text_ids, tmp_path):
    from tierkv.engine import prefill

    ids = torch.tensor(text_ids[:1500])
    tiered = tierkv.load(smol.source, device="cpu", dtype="fp32", kv_gpu_budget="16MiB", cpu_budget="8MiB",
                         disk_dir=str(tmp_path), sink_tokens=32, window_tokens=64, prefill_chunk=512)
    c1, c2 = smol.new_cache(1600), tiered.new_cache(1600)
    with torch.no_grad():
        a = prefill(smol.model, ids, c1, 512, all_logits=True)
        b = prefill(tiered.model, ids, c2, 512, all_logits=True)
        assert c2.stats()["chunks"]["disk"] > 0
        diff = (a - b).abs().max().item()
    c1.close()
    c2.close()
    print(f"tiered vs dense prefill logits: max abs diff {diff:.2e}")
    assert diff < 1e-4
