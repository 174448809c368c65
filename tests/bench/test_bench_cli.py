"""`tierkv bench io` and `tierkv bench decode` through the real CLI on the CPU: JSON complete and plausible."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # 2 shared cores: torch's thread pool would only spin


def tierkv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tierkv", *args], capture_output=True, text=True, timeout=300, env=ENV)


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def last_json_line(stdout: str) -> dict:
    line = json.loads(stdout.strip().splitlines()[-1])
    assert {"device", "date", "command"} <= set(line)
    return line


@pytest.mark.slow
def test_bench_io_json(tmp_path):
    out = tmp_path / "io.json"
    r = tierkv("bench", "io", "--json", str(out), "--sizes", "64KiB,1MiB", "--repeats", "3",
               "--disk-dir", str(tmp_path / "disk"))
    assert r.returncode == 0, r.stderr
    assert "bench io" in last_json_line(r.stdout)["command"]
    doc = json.loads(out.read_text())
    assert list(doc)[-3:] == ["device", "date", "command"]
    names = {e["name"] for e in doc["results"]}
    assert {"host_to_host", "disk_to_host", "scatter_host_gather_copy"} <= names
    for e in doc["results"]:
        assert positive(e["size"]) and e["repeats"] == 3 and positive(e["seconds_median"])
        g = e["gbps"]
        assert all(positive(g[k]) for k in ("min", "median", "max")) and g["min"] <= g["median"] <= g["max"]
    disk = [e for e in doc["results"] if e["name"] == "disk_to_host"]
    assert {e["size"] for e in disk} == {65536, 1 << 20} and all(e["backend"] == "posix" for e in disk)
    assert "cold" in disk[0]["page_cache"] or "warm" in disk[0]["page_cache"]
    skipped = {s["name"]: s["reason"] for s in doc["skipped"]}
    if not doc["device"].startswith("cpu"):
        pytest.skip("CPU expectations only")
    assert skipped["host_to_device_pinned"] == "no CUDA device"
    assert any(k.startswith("disk_to_host (kvikio") for k in skipped) or any(e["backend"].startswith("kvikio")
                                                                              for e in disk)
    assert not list((tmp_path / "disk").iterdir())  # the read file is removed


@pytest.mark.slow
def test_bench_decode_json_and_one_line_errors(tmp_path):
    out = tmp_path / "decode.json"
    r = tierkv("bench", "decode", "llama-tiny", "--context", "1K,2K", "--json", str(out), "--steps", "4",
               "--warmup", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    line = last_json_line(r.stdout)
    assert set(line["ms_per_token"]) == {f"{s}@{c}" for s in ("tierkv-sparse", "tierkv-sparse-eager", "tierkv-exact",
                                                                "hf-default", "hf-offloaded", "hf-accelerate")
                                        for c in ("1K", "2K")}
    doc = json.loads(out.read_text())
    assert list(doc)[-3:] == ["device", "date", "command"]
    assert doc["contexts"] == [1024, 2048] and positive(doc["weights_bytes"]) and positive(doc["kv_bytes_per_token"])
    assert all(positive(doc["rates"][k]) for k in ("hbm", "h2d", "d2h", "disk"))
    rows = {(x["system"], x["context"]): x for x in doc["rows"]}
    assert len(rows) == 12
    for row in rows.values():
        assert row["status"] in ("ok", "over_budget", "oom", "cannot_run", "unavailable", "skipped", "error")
        assert row["status"] != "error", row["reason"]
        if row["status"] != "ok":
            assert row["reason"] and row["decode_ms"] is None
            continue
        assert all(positive(row["decode_ms"][k]) for k in ("min", "median", "max")) and row["steps"] == 4
        for key in ("prefill_tok_s", "peak_memory_bytes", "floor_ms", "measured_over_floor"):
            assert positive(row[key]), (row["system"], key, row[key])
        assert all(positive(v) for v in row["floor_parts_ms"].values())
        assert row["bytes_source"] and all(v >= 0 and math.isfinite(v) for v in row["bytes_per_token"].values())
        assert row["copy_hidden_note"]
    for c in (1024, 2048):
        assert rows[("tierkv-exact", c)]["status"] == "ok" and rows[("hf-default", c)]["status"] == "ok"
        assert rows[("hf-offloaded", c)]["status"] == "unavailable"  # needs CUDA
        assert rows[("hf-accelerate", c)]["status"] in ("unavailable", "skipped")
        exact = rows[("tierkv-exact", c)]
        assert exact["bytes_per_token"]["host->device"] > 0  # a quarter of the KV on the device: the rest streams
        assert math.isclose(sum(exact["hit_rate"].values()), 1.0) and 0 <= exact["copy_hidden_share"] <= 1
        for name in ("tierkv-sparse", "tierkv-sparse-eager"):
            sparse = rows[(name, c)]
            assert sparse["status"] in ("ok", "unavailable", "cannot_run"), sparse["reason"]
            assert sparse["settings"]["decode"] == "eager"  # no CUDA graphs on the CPU
            assert sparse["settings"]["budget_tokens"] == 2048  # the default's floor at 1K and 2K
    # the library's default budget (1/8, at least 2,048 tokens), resolved per context
    assert (doc["settings"]["token_budget"], doc["settings"]["budget_floor_tokens"]) == (0.125, 2048)
    assert doc["settings"]["budget_tokens"] == {"1024": 2048, "2048": 2048}
    bad = tierkv("bench", "decode", "llama-tiny", "--context", "12Q")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: context '12Q'")
    assert len(bad.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flags,msg", [
    (("--token-budget", "-5"), "error: token_budget=-5 must be"),
    (("--token-budget", "2048.5"), "error: token_budget=2048.5 must be"),
    (("--budget-floor-tokens", "-1"), "error: budget_floor_tokens=-1")])
def test_a_bad_token_budget_is_refused_in_one_line_before_any_model_loads(flags, msg):
    bad = tierkv("bench", "decode", "llama-tiny", "--context", "1K", "--device", "cpu", *flags)
    assert bad.returncode == 2 and bad.stderr.strip().startswith(msg), bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "loading" not in bad.stdout + bad.stderr


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flags,budget,floor,tokens", [
    ((), 0.125, 2048, {4096: 2048, 16384: 2048, 32768: 4096, 131072: 16384}),  # the library's defaults
    (("--token-budget", "2048"), 2048, 2048, {4096: 2048, 16384: 2048, 32768: 2048, 131072: 2048}),
    (("--token-budget", "0.125", "--budget-floor-tokens", "0"), 0.125, 0,
     {4096: 512, 16384: 2048, 32768: 4096, 131072: 16384})])
def test_decode_takes_the_library_token_budget_unless_given_and_records_the_tokens(monkeypatch, flags, budget, floor,
                                                                                    tokens):
    import torch
    from click.testing import CliRunner

    from tierkv.bench import decode
    from tierkv.bench.systems import tier_config
    from tierkv.cli.bench import command
    from tierkv.config import TierConfig
    from tierkv.models.shapes import shape_config

    specs = []

    def stop(spec, **kw):
        specs.append(spec)
        raise _Stop

    monkeypatch.setattr(decode, "run_decode", stop)
    r = CliRunner().invoke(command, ["decode", "llama-tiny", "--context", "4K,16K,32K,128K", "--device", "cpu", *flags])
    assert isinstance(r.exception, _Stop), r.output
    spec = specs[0]
    assert (spec.token_budget, spec.budget_floor_tokens) == (budget, floor)
    cfg = shape_config("llama-tiny")
    settings = decode._settings(spec, cfg)
    assert (settings["token_budget"], settings["budget_floor_tokens"], settings["budget_tokens"]) == (budget, floor,
                                                                                                       tokens)
    sparse = tier_config("tierkv-sparse", spec, 1 << 30, cfg)
    assert (sparse.token_budget, sparse.budget_floor_tokens) == (budget, floor)
    assert {c: sparse.budget_tokens(c) for c in spec.contexts} == tokens
    if not flags:
        assert (budget, floor) == (TierConfig().token_budget, TierConfig().budget_floor_tokens)
        bare = decode.DecodeSpec(model="x", contexts=[1024], device=torch.device("cpu"), dtype=torch.float32)
        assert (bare.token_budget, bare.budget_floor_tokens) == (budget, floor)


def test_parse_contexts_and_sizes():
    from tierkv.bench.common import format_context, parse_contexts, parse_sizes
    from tierkv.errors import TierKVError

    assert parse_contexts("1K,32K, 128K,256K,4096") == [1024, 32768, 131072, 262144, 4096]
    assert [format_context(c) for c in (1024, 131072, 1000)] == ["1K", "128K", "1000"]
    assert parse_sizes("64KiB,1MiB,256MiB") == [65536, 1 << 20, 256 << 20]
    for bad in ("", "K", "-1K", "0"):
        with pytest.raises(TierKVError):
            parse_contexts(bad)


@pytest.mark.slow
def test_decode_reports_each_finished_row_as_it_goes():
    import torch

    from tierkv.bench.decode import run_decode
    from tierkv.bench.systems import DecodeSpec

    spec = DecodeSpec(model="llama-tiny", contexts=[1024], device=torch.device("cpu"), dtype=torch.float32,
                      systems=("tierkv-exact", "hf-offloaded"), steps=2, warmup=1)
    seen = []
    doc = run_decode(spec, on_partial=seen.append)
    assert [len(d["rows"]) for d in seen] == [1, 2] and all(d["partial"] for d in seen)
    assert seen[0]["rows"][0]["system"] == "tierkv-exact" and seen[0]["rows"][0]["floor_ms"] > 0  # finished rows
    assert "partial" not in doc and [r["system"] for r in doc["rows"]] == ["tierkv-exact", "hf-offloaded"]


@pytest.mark.slow
def test_decode_append_keeps_earlier_rows(tmp_path):
    out = tmp_path / "d.json"
    common = ("bench", "decode", "llama-tiny", "--context", "1K", "--json", str(out), "--steps", "2", "--warmup", "1",
              "--device", "cpu")
    assert tierkv(*common, "--systems", "hf-default").returncode == 0
    r = tierkv(*common, "--systems", "tierkv-exact", "--append")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert [x["system"] for x in doc["rows"]] == ["tierkv-exact", "hf-default"] and len(doc["earlier_runs"]) == 1
    assert "partial" not in doc and not (tmp_path / "d.json.tmp").exists()


def test_decode_table_counts_the_graph_caches_gpu_sources_as_device_hits():
    from tierkv.bench.report import decode_table

    row = {"system": "tierkv-sparse", "context": 32768, "status": "ok", "decode_ms": {"median": 8.6},
           "prefill_tok_s": 5000.0, "peak_memory_bytes": 2**34, "memory_kind": "cuda", "bytes_per_token": {},
           "hit_rate": {"gpu_chunk_cache": 0.1, "gpu_resident": 0.6, "host": 0.3}, "copy_hidden_share": None,
           "floor_ms": 6.0, "measured_over_floor": 1.4}
    line = next(ln for ln in decode_table({"rows": [row]}).splitlines() if ln.startswith("32K"))
    assert " 70/30/0 " in line


@pytest.mark.slow  # loads SmolLM2 and streams half its layers on 2 shared cores
def test_bench_decode_under_gpu_budget_follows_the_plan(tmp_path):
    from tierkv.models.weights import resolve_model

    out = tmp_path / "offload.json"
    r = tierkv("bench", "decode", str(resolve_model(None)), "--context", "1K", "--gpu-budget", "700MiB",
               "--systems", "tierkv-exact", "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr
    row = json.loads(out.read_text())["rows"][0]
    assert row["status"] == "ok" and positive(row["plan_ms"]) and positive(row["weights_bound_ms"])
    counts = row["weights"]["counts"]
    assert counts["host"] > 0 and counts == row["settings"]["plan"]["counts"]
    assert row["weights"]["streamed_bytes_per_token"] == row["weights"]["bytes"]["host"]  # each host layer once
    assert row["settings"]["kv_gpu_budget_from"].startswith("the plan under gpu budget")
    assert "plan ms" in r.stdout and "w-bound ms" in r.stdout


def test_bench_decode_dense_is_full_attention_with_every_kv_on_the_device(tmp_path):
    out = tmp_path / "dense.json"
    r = tierkv("bench", "decode", "llama-tiny", "--context", "1K", "--systems", "tierkv-dense,tierkv-exact",
               "--steps", "2", "--warmup", "1", "--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rows = {x["system"]: x for x in json.loads(out.read_text())["rows"]}
    dense, exact = rows["tierkv-dense"], rows["tierkv-exact"]
    assert dense["status"] == "ok" and positive(dense["decode_ms"]["median"]), dense["reason"]
    assert dense["settings"]["kv_gpu_budget"] is None
    assert "every K/V on the device" in dense["settings"]["kv_gpu_budget_from"]
    assert dense["settings"]["decode"] == "eager"  # the dense cache on the CPU; the static one, captured, on CUDA
    assert exact["settings"]["kv_gpu_budget"] > 0 and exact["bytes_per_token"]["host->device"] > 0
