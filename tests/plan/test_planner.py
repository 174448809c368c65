"""The planner's arithmetic against hand-computed cases (tierkv/plan/). Defaults throughout unless a test says:
bf16, token budget 1/8 of the context (at least 2,048 tokens), chunk 32, shadow rank 96, score rank 48, 64 sinks +
128 window tokens, prefill slice 2048, bandwidths HBM 2.5 TB/s, link 52 GB/s, CPU 20 GB/s, disk 1 GB/s.

Shared numbers (Llama-3.1-8B: hidden 4096, 32 heads, 8 KV heads, head_dim 128, intermediate 14336, vocab 128256):
  layer L = 2 B * (6144*4096 [qkv] + 4096*4096 [o] + 3*14336*4096 [mlp] + 2*4096 [norms]) = 436,224,000
  embedding E = lm_head = 2 * 128256 * 4096 = 1,050,673,152; final norm 8,192
  activations = 2 * 2048 * (4*4096 + 6144 + 3*14336) + 8 * 128256 = 268,435,456 + 1,026,048 = 269,461,504
  workspace = 268,435,456
  full attention's tiered cache holds on the GPU, besides its pool, per layer an open chunk and 2 sink + 4 window
  chunks, and two batches of 128 chunks: (32 * 7 + 256) * 131,072 (chunk of 32 tokens x 4,096 B) = 62,914,560
"""

from __future__ import annotations

import pytest

from tierkv.config import TierConfig
from tierkv.errors import BudgetError, ConfigError
from tierkv.kv.caches.window_ring import ROLLBACK_ROOM
from tierkv.models.shapes import shape_config
from tierkv.plan import Bandwidths, PlanDoesNotFitError, PlanInputs, make_plan, spread
from tierkv.plan.bandwidth import bandwidths_from_probe
from tierkv.plan.inputs import default_sparse_shape

GiB = 1024**3
L8B = 436_224_000
E8B = 1_050_673_152


def plan8b(context: int, gpu: int, cpu: int = 64 * GiB, **kw):
    return make_plan(PlanInputs(shape_config("llama3.1-8b"), context, gpu, cpu, **kw))


def test_llama8b_128k_on_24gib_keeps_every_layer_and_goes_sparse():
    # sparse fixed GPU bytes per layer at 131072 tokens:
    #   shadow 131072*96*2 = 25,165,824 + basis 96*1024*2 = 196,608; index 131072*8*(48+4) = 54,525,952
    #   + basis 8*48*128*(2 + 4 for its fp32 copy) = 294,912; key ring (512+64+2048)*1024*2 = 5,373,952;
    #   per chunk (flag 1 + error 4 + slot 8) * 4,096 = 53,248
    #   = 85,610,496; x32 layers = 2,739,535,872
    # fixed = lm_head+norm 1,050,681,344 + 269,461,504 + 268,435,456 + 2,739,535,872 = 4,328,114,176
    # room = 24 GiB 25,769,803,776 - 4,328,114,176 = 21,441,689,600 >= 32 L + E = 15,009,841,152: all resident
    p = plan8b(131072, 24 * GiB)
    assert p.attention == "sparse"
    assert p.layers == ("gpu",) * 32 and p.embedding == "gpu" and p.staging_slots == 0
    assert p.gpu["kv_fixed"] == 2_739_535_872
    # pool = 21,441,689,600 - 15,009,841,152 = 6,431,848,448 -> 6,431,848,448 // 65,536 (values/token) = 98,142
    assert p.gpu["kv_pool"] == 98_142 * 65_536
    # picks: (16384 - 192 + 2*192) * 65,536 = 1,086,324,736; over the link (1 - 98142/131072) of it:
    #   16576 * 32930 / 2 = 272,923,840
    assert p.traffic.link_kv == pytest.approx(272_923_840, abs=1)
    # HBM: weights 32 L + lm_head + norm = 15,009,849,344; KV: index 32*131072*8*52 = 1,744,830,464
    #   + shadow rows 32*16384*96*2 = 100,663,296 + resident picks 813,400,896 = 2,658,894,656
    assert p.traffic.hbm_weights == 15_009_849_344
    assert p.traffic.hbm_kv == pytest.approx(2_658_894_656, abs=1)
    # 17,668,744,000 B / 2.5e12 B/s = 7.0675 ms; link 272,923,840 / 52e9 = 5.25 ms: HBM binds
    assert p.timing.ms_per_token == pytest.approx(7.0674976, rel=1e-9)
    assert p.timing.bound == "hbm"
    # full: KV 16 GiB; the GPU room 21,441,689,600 + 2,739,535,872 (no shadows) - 62,914,560 (tiered fixed)
    #   - 15,009,841,152 = 9,108,469,760 on the GPU, 8,071,399,424 over the link = 155.22 ms: sparse chosen
    assert "full (exact) predicts 155.22" in p.reasons[0]
    assert sum(p.gpu.values()) <= 24 * GiB


def test_llama8b_128k_on_12gib_streams_15_layers_spread():
    # room = 12 GiB 12,884,901,888 - 4,328,114,176 = 8,556,787,712 < 32 L: the embedding goes to the host and
    # (room - 2 slots * L) // L = 7,684,339,712 // 436,224,000 = 17 resident; 15 spill, none adjacent: 2 slots
    p = plan8b(131072, 12 * GiB)
    assert p.attention == "sparse" and p.embedding == "host" and p.staging_slots == 2
    assert p.count("gpu") == 17 and p.count("host") == 15 and p.count("cpu") == 0
    # spread(32, 15): floor((2j+1)*32/30)
    assert [i for i, place in enumerate(p.layers) if place == "host"] == \
        [1, 3, 5, 7, 9, 11, 13, 16, 18, 20, 22, 24, 26, 28, 30]
    # GPU left: 12,884,901,888 - 4,328,114,176 - 17 L - 2 L = 268,531,712 -> 4,097 tokens of values
    assert p.gpu["kv_pool"] == 4_097 * 65_536
    # link: 15 L = 6,543,360,000 + picks 16576 * (131072 - 4097) / 2 = 1,052,368,800 -> / 52e9 = 146.0717 ms
    assert p.traffic.link_weights == 15 * L8B
    assert p.traffic.link_kv == pytest.approx(1_052_368_800, abs=1)
    assert p.timing.ms_per_token == pytest.approx(7_595_728_800 / 52e6, rel=1e-9)
    assert p.timing.bound == "link"
    assert p.host["embedding"] == E8B and p.host["streamed_weights"] == 15 * L8B
    assert sum(p.gpu.values()) <= 12 * GiB


def test_qwen7b_32k_on_12gib():
    # Qwen2.5-7B: L = 2 * (4608*3584 + 4608 [bias] + 3584*3584 + 3*18944*3584 + 2*3584) = 466,115,584;
    # E = lm_head = 2 * 152064 * 3584 = 1,089,994,752; activations 4096 * 75776 + 8 * 152064 = 311,595,008
    # sparse per layer at 32768: 6,291,456 + 98,304 + 32768*4*52 = 6,815,744 + 4*48*128*(2+4) = 147,456
    #   + 2624*512*2 = 2,686,976 + 13 * 1,024 = 13,312 = 16,053,248; x28 = 449,490,944
    # fixed = 1,090,001,920 + 311,595,008 + 268,435,456 + 449,490,944 = 2,119,523,328
    # room = 10,765,378,560 < 28 L: embedding to the host; (room - 2 L) // L = 9,833,147,392 // L = 21 resident
    p = make_plan(PlanInputs(shape_config("qwen2.5-7b"), 32768, 12 * GiB, 64 * GiB))
    assert p.attention == "sparse" and p.embedding == "host"
    assert p.count("gpu") == 21 and p.count("host") == 7 and p.staging_slots == 2
    assert p.gpu["kv_fixed"] == 449_490_944
    # pool: 12,884,901,888 - 2,119,523,328 - 23 L = 44,720,128 -> // 28,672 = 1,559 tokens
    assert p.gpu["kv_pool"] == 1_559 * 28_672
    # picks (4096 - 192 + 384) * 28,672 = 122,945,536; link share (32768 - 1559) / 32768 -> 117,096,168
    assert p.traffic.link_kv == pytest.approx(117_096_168, abs=1)
    # (7 L 3,262,809,088 + 117,096,168) / 52e9 = 64.9982 ms
    assert p.timing.ms_per_token == pytest.approx(3_379_905_256 / 52e6, rel=1e-9)


def test_budget_too_small_names_the_minimum_and_the_minimum_fits():
    # smallest GPU: full attention (no shadows) with every layer streamed through 3 slots:
    #   1,050,681,344 + 269,461,504 + 268,435,456 + tiered fixed 62,914,560 + 3 L 1,308,672,000 = 2,960,164,864
    # host then holds 32 L + E + all KV 131072 * 131,072 = 13,959,168,000 + 1,050,673,152 + 17,179,869,184
    with pytest.raises(PlanDoesNotFitError) as err:
        plan8b(131072, 2 * GiB)
    assert err.value.min_gpu_budget == 2_960_164_864
    assert err.value.min_cpu_budget == 32_189_710_336
    assert isinstance(err.value, BudgetError) and "\n" not in str(err.value)
    assert "gpu_budget=2.76 GiB" in str(err.value)
    ok = plan8b(131072, 2_960_164_864, 32_189_710_336)
    assert ok.count("gpu") == 0 and ok.staging_slots == 3 and ok.attention == "full"
    for gpu, cpu in ((2_960_164_864 - 1, 32_189_710_336), (2_960_164_864, 32_189_710_336 - 1)):
        with pytest.raises(PlanDoesNotFitError):
            plan8b(131072, gpu, cpu)


def test_cpu_budget_too_small_names_the_cpu_minimum():
    # 24 GiB, full attention: 9,108,469,760 of the 17,179,869,184 KV bytes on the GPU (see the 24 GiB case), the
    # rest must be on the host
    with pytest.raises(PlanDoesNotFitError) as err:
        plan8b(131072, 24 * GiB, 2 * GiB)
    assert err.value.min_cpu_budget == 17_179_869_184 - 9_108_469_760
    assert "cpu_budget=7.52 GiB" in str(err.value)


@pytest.mark.parametrize("n", [1, 7, 28, 32, 64])
def test_spread_is_even(n):
    for k in range(1, n + 1):
        pos = spread(n, k)
        assert pos == sorted(set(pos)) and 0 <= pos[0] and pos[-1] < n
        # gaps around the ring: prefetch crosses token boundaries, so the last layer precedes layer 0
        gaps = [b - a for a, b in zip(pos, pos[1:] + [pos[0] + n])]
        assert max(gaps) - min(gaps) <= 1
        assert (1 in gaps) == (k > n - k)


def test_cpu_layers_chosen_when_host_dram_outruns_the_link():
    # 8B at 32K on 12 GiB streams 10 layers (the CLI test's case). With a 25 GB/s link and 60 GB/s host DRAM:
    # a streamed layer costs 436,224,000 / 25e9 = 17.45 ms of link, a CPU layer 436,224,000 / 60e9 + 0.04 = 7.31
    # ms. The link still carries the KV picks (280 MB = 11.2 ms > HBM 6 ms), so each layer moved to the CPU
    # saves 17.45 ms and costs 7.31: all 10 go to the CPU.
    bw = Bandwidths(hbm=2.5e12, link=25e9, cpu=60e9, disk=1e9)
    p = plan8b(32768, 12 * GiB, bandwidths=bw, attention="sparse")
    assert p.count("cpu") == 10 and p.count("host") == 0
    assert p.host["cpu_weights"] == 10 * L8B and p.traffic.link_weights == 0
    slow = plan8b(32768, 12 * GiB, attention="sparse")  # default: CPU 20 GB/s < link 52 GB/s
    assert slow.count("cpu") == 0 and slow.count("host") == 10


def test_sliding_window_layers_keep_only_their_window():
    cfg = shape_config("llama-tiny")  # 2 layers, 2 KV heads x 16 dims: 128 B of K+V per token per layer (fp32 4 B)
    chunk32 = default_sparse_shape()  # TierConfig's 32-token chunks (llama-tiny's own narrow-key default is 16)
    both = make_plan(PlanInputs(cfg, 4096, 1 * GiB, 1 * GiB, dtype="fp32", attention="full", sparse=chunk32))
    windowed = make_plan(PlanInputs(cfg, 4096, 1 * GiB, 1 * GiB, dtype="fp32", attention="full", sparse=chunk32,
                                    layer_windows=(None, 64)))
    per = 2 * 2 * 16 * 4
    assert both.gpu["kv_pool"] == 2 * 4096 * per
    # the window layer's ring (its 64 tokens and the rollback room, kv/caches/window_ring.py) and the tiered cache's
    # chunks of the full layer: (1 * 7 + 2 * 128) chunks of 32 * per
    assert windowed.gpu["kv_pool"] == 4096 * per
    assert windowed.gpu["kv_fixed"] == (64 + ROLLBACK_ROOM) * per + 263 * 32 * per


def test_disk_layers_when_host_is_short():
    # 12 GiB, 32K, sparse: 10 layers spill. cpu_budget 2 GiB: minus E leaves 1,096,810,496 -> 2 layers would fit,
    # but disk layers need 2 pinned staging layers: (1,096,810,496 - 2 L) // L = 0 host layers, 10 on disk
    p = plan8b(32768, 12 * GiB, 2 * GiB, disk_budget=64 * GiB, attention="sparse")
    assert p.count("disk") == 10 and p.count("host") == 0
    assert p.timing.bound == "disk"
    # 10 L at 1 GB/s = 4362 ms, plus the KV that no longer fits the host (read at disk speed for its share)
    assert p.timing.disk_ms >= 10 * L8B / 1e6


def test_probe_document_sets_link_disk_cpu():
    doc = {"device": "NVIDIA H200", "results": [
        {"name": "host_to_device_pinned", "size": 1 << 20, "gbps": {"median": 32.0}},
        {"name": "host_to_device_pinned", "size": 256 << 20, "gbps": {"median": 54.0}},
        {"name": "disk_to_host", "size": 256 << 20, "gbps": {"median": 1.5}},
        {"name": "host_to_host", "size": 256 << 20, "gbps": {"median": 9.0}}]}
    bw = bandwidths_from_probe(doc, "x.json", gpu_name="NVIDIA H200")
    assert (bw.link, bw.disk, bw.cpu, bw.hbm) == (54e9, 1.5e9, 9e9, 4000e9)
    assert "NVIDIA H200" in bw.source["link"]
    with pytest.raises(ConfigError):
        bandwidths_from_probe({"results": [{"name": "x"}]}, "bad.json")


def test_probe_cpu_rate_is_the_measured_cpu_gemv():
    from tierkv.bench.io import cpu_gemv_entries

    got, skipped = cpu_gemv_entries([1 << 20, 4 << 20], repeats=2)
    assert [e["name"] for e in got] == ["cpu_gemv"] and got[0]["size"] == 4 << 20 and not skipped
    assert got[0]["gbps"]["median"] > 0
    doc = {"results": [*got, {"name": "host_to_host", "size": 4 << 20, "gbps": {"median": 1e6}}]}
    assert bandwidths_from_probe(doc, "x.json").cpu == pytest.approx(got[0]["gbps"]["median"] * 1e9)


@pytest.mark.parametrize("context,settings,tokens", [(8192, {}, 2048), (8192, {"budget_floor_tokens": 0}, 1024),
                                                     (1000, {}, 1000), (32768, {}, 4096), (131072, {}, 16384),
                                                     (8192, {"token_budget": 512}, 512),
                                                     (8192, {"token_budget": 0.25, "budget_floor_tokens": 3000}, 3000)])
def test_the_sparse_budget_is_the_runtimes(context, settings, tokens):
    """The planner attends what TierConfig.budget_tokens gives (floor included), at most the context."""
    inp = PlanInputs(shape_config("llama3.1-8b"), context, 24 * GiB, 64 * GiB, attention="sparse", **settings)
    assert inp.budget_tokens() == tokens == min(context, TierConfig(**settings).budget_tokens(context))
    assert make_plan(inp).token_budget_tokens == tokens


def test_the_planner_refuses_a_bad_floor_as_the_runtime_does():
    with pytest.raises(ConfigError, match=r"budget_floor_tokens=-1 must be a token count \(int >= 0\)"):
        PlanInputs(shape_config("llama3.1-8b"), 8192, 24 * GiB, 64 * GiB, budget_floor_tokens=-1)


def test_load_plans_with_the_floor_it_was_given():
    """tierkv.load(gpu_budget=..., budget_floor_tokens=...) plans with that floor (plan/load.py threads it)."""
    import torch

    from tierkv.plan.load import Offload, plan_for_load

    cfg, cpu = shape_config("llama-tiny"), torch.device("cpu")
    assert plan_for_load(cfg, torch.float32, cpu, 8192, "512MiB", attention="sparse").plan.token_budget_tokens == 2048
    off = Offload("512MiB", None, 8192)
    given = {"attention": "sparse", "budget_floor_tokens": 0}
    tier, _ = off.prepare(cfg, cpu, torch.float32, TierConfig(**given), given, None)
    assert off.plan.token_budget_tokens == 1024 == tier.budget_tokens(8192)
