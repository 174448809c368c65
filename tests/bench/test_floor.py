"""Floor arithmetic: weight bytes match the transformers model of the shape; parts add up at given rates."""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from tierkv.bench.floor import Rates, floor_ms, kv_bytes, kv_bytes_per_token, weight_bytes
from tierkv.bench.hf import build_hf, param_bytes
from tierkv.bench.systems import DecodeSpec
from tierkv.models.shapes import shape_config


def test_weight_bytes_match_transformers_model():
    cfg = shape_config("llama-tiny")
    spec = DecodeSpec(model="llama-tiny", contexts=[64], device=torch.device("cpu"), dtype=torch.float32)
    model, _ = build_hf(spec, cfg, 128, "cpu")
    assert param_bytes(model)[0] == weight_bytes(cfg, torch.float32)
    assert weight_bytes(shape_config("llama3.1-8b"), torch.bfloat16) == 2 * 8_030_261_248
    assert kv_bytes_per_token(shape_config("llama3.1-8b"), torch.bfloat16) == 128 * 1024


def test_sliding_window_layers_count_their_window_only():
    """Gemma 3 270M's shape (18 layers, every sixth global, window 512, one KV head of 256): a token adds the
    three global layers' K/V, a sixth of an all-global model's; the windows are a fixed 15 x 512 positions."""
    cfg = replace(shape_config("llama-tiny"), num_layers=18, num_kv_heads=1, head_dim=256,
                  layer_windows=tuple(None if i % 6 == 5 else 512 for i in range(18)))
    per_layer = 2 * 256 * 2  # K and V of one token in bf16
    assert cfg.full_attention_layers == 3 and cfg.kv_bytes_per_token == 3 * per_layer
    assert kv_bytes_per_token(cfg, torch.bfloat16) == 3 * per_layer
    assert kv_bytes(cfg, torch.bfloat16, 32768) == (3 * 32768 + 15 * 512) * per_layer
    assert kv_bytes(cfg, torch.bfloat16, 100) == 18 * 100 * per_layer  # windows not yet full


def test_floor_parts_use_the_rate_of_each_pair():
    rates = Rates(hbm=2e12, h2d=50e9, d2h=40e9, disk=1e9)
    total, parts = floor_ms({"weights_hbm": 16e9, "host->device": 1e9, "disk->device": 1e8, "device->host": 0.0}, rates)
    assert math.isclose(parts["weights_hbm"], 8.0) and math.isclose(parts["host->device"], 20.0)
    assert math.isclose(parts["disk->device"], 100.0) and "device->host" not in parts
    assert math.isclose(total, 128.0)


def _tier_row(bytes_per_token: dict, reads: str | None):
    from tierkv.bench.systems import Row

    return Row("tierkv-exact", 1024, decode_ms={"median": 50.0}, bytes_per_token=bytes_per_token,
               bytes_source="tier stats", io_wait_ms_per_token=0.0, memory_kind="cpu-rss",
               settings={"reads": reads} if reads else {})


def test_hidden_share_is_not_claimed_for_reads_the_host_never_waits_on():
    """GPU reads of mapped host memory never block the host: a 0 ms host wait says nothing, so no share; host
    copies (or any disk traffic) keep the estimate."""
    from tierkv.bench.decode import finish_row

    rates = Rates(hbm=2e12, h2d=50e9, d2h=40e9, disk=1e9)
    cfg = shape_config("llama-tiny")
    spec = DecodeSpec(model="llama-tiny", contexts=[1024], device=torch.device("cpu"), dtype=torch.float32)
    mapped = _tier_row({"host->device": 1e9}, "by GPU gathers from mapped pinned host memory on the copy stream")
    finish_row(mapped, rates, cfg, spec)
    assert mapped.copy_hidden_share is None and mapped.copy_hidden_note.startswith("not measured")
    copied = _tier_row({"host->device": 1e9}, None)
    finish_row(copied, rates, cfg, spec)
    assert copied.copy_hidden_share == 1.0
    with_disk = _tier_row({"host->device": 1e9, "disk->device": 1e8}, "by GPU gathers from mapped pinned memory")
    finish_row(with_disk, rates, cfg, spec)
    assert with_disk.copy_hidden_share == 1.0


def test_link_bound_adds_the_kv_that_crosses_the_link_beside_the_weights():
    """The 8B shape's 16 GiB row (H100, 2026-12-06): 1.309 GB of weights and 0.246 GB of K/V picks per token over a
    54.2 GB/s link; the weights bound counts the first, the link bound both."""
    from tierkv.bench.decode import finish_row

    rates = Rates(hbm=2.744e12, h2d=54.2e9, d2h=53.9e9, disk=1.3e9)
    cfg = shape_config("llama3.1-8b")
    spec = DecodeSpec(model="llama3.1-8b", contexts=[32768], device=torch.device("cpu"), dtype=torch.bfloat16)
    row = _tier_row({"host->device": 246_426_624.0}, "by GPU kernels from mapped pinned host memory")
    row.weights = {"streamed_bytes_per_token": 1_308_622_848, "bytes": {"gpu": 12_650_020_864, "host": 1_308_622_848,
                                                                      "disk": 0, "cpu": 0}}
    finish_row(row, rates, cfg, spec)
    assert math.isclose(row.weights_bound_ms, 1e3 * 1_308_622_848 / 54.2e9)
    assert math.isclose(row.link_bound_ms, 1e3 * (1_308_622_848 + 246_426_624) / 54.2e9)
    assert 28.6 < row.link_bound_ms < 28.8 and 24.1 < row.weights_bound_ms < 24.2


def test_a_captured_rows_weight_rate_comes_from_its_measured_steps():
    """The 12 GiB row of 2026-12-06 streamed 5.67 GB a token at 111.4 ms (51 GB/s); the call's decode time, with
    the warm-up steps and the capture in it, had read 15 GB/s."""
    from tierkv.bench.systems import Row, _measured_weight_rate

    row = Row(system="tierkv-sparse", context=32768)
    row.decode_ms = {"min": 109.9, "median": 111.42, "max": 113.9}
    row.weights = {"decode": "graph", "streamed_bytes_per_token": 5_670_699_008, "achieved_gbps": 15.1}
    _measured_weight_rate(row)
    assert math.isclose(row.weights["achieved_gbps"], 5.670699008 / 0.11142, rel_tol=1e-9)
    eager = Row(system="tierkv-sparse", context=32768)
    eager.decode_ms = row.decode_ms
    eager.weights = {"decode": "eager", "streamed_bytes_per_token": 1, "achieved_gbps": 40.0}  # measured copies
    _measured_weight_rate(eager)
    assert eager.weights["achieved_gbps"] == 40.0
