"""Layer weights offloaded on SmolLM2 (CPU): host-streamed, disk-streamed and CPU-computed layers give the greedy
output of the fully resident model, through decode (forward) and the layer-after-layer prefill; gpu_budget
plans the placement and the KV budget; bad budgets and placements are one-line errors.

On the CPU the compute device is the CPU, so the device pool is the budgeted tier: streamed layers are packed
into host blocks and copied into the streamer's slots, disk layers are read from the checkpoint at their offsets
into staging buffers, CPU layers compute from their own host block.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tierkv
from tierkv.config import TierConfig
from tierkv.engine import prefill
from tierkv.errors import BudgetError, ConfigError
from tierkv.kv.caches.sparse import SparseKVCache
from tierkv.kv.sparse.options import SparseOptions
from tierkv.weights.store import parse_placement

SHORT = "The capital of France is"
# longer than PREFILL (16 tokens): prefill runs as several passes over the layers
LONG = "Alice has three apples and Bob has five apples. They put all of them in one basket. How many apples"
PREFILL = 16
NEW = 6


def replies(llm) -> list[list[int]]:
    return [list(llm.stream_ids(llm.encode(prompt=p), max_new_tokens=NEW)) for p in (SHORT, LONG)]


@pytest.fixture(scope="module")
def base():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as conftest's one_thread, for the whole module
    yield tierkv.load(device="cpu", prefill_chunk=PREFILL)
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(base):
    return replies(base)


def layer_prefill_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a layer-after-layer prefill (forward_by_layer) into the sparse graph cache, slices of 32."""
    c = model.cfg
    tier = TierConfig(attention="sparse", token_budget=64, sink_tokens=32, window_tokens=32, chunk_size=32)
    cache = SparseKVCache(c.num_layers, c.num_kv_heads, c.head_dim, device=model.device, dtype=model.dtype,
                              config=tier, capacity=len(ids) + 8, rope=model.rope, sparse=SparseOptions(fold_tokens=32))
    try:
        logits = prefill(model, ids, cache, 32, by_layer=True)
        assert cache.stats()["layer_prefills"] == 1
        return logits
    finally:
        cache.close()


@pytest.mark.parametrize("placement, kinds", [
    # the mixed case covers the three kinds in one load; each kind alone is in the slow suite
    ("host=0,29 disk=10 cpu=11", {"host": 2, "disk": 1, "cpu": 1}),  # 29 precedes 0 around the ring: 3 slots
    pytest.param("host=1,2,9,20", {"host": 4}, marks=pytest.mark.slow),  # 1 and 2 are neighbours: 3 slots
    pytest.param("disk=3,17", {"disk": 2}, marks=pytest.mark.slow),
    pytest.param("cpu=5,28", {"cpu": 2}, marks=pytest.mark.slow),
])
def test_offloaded_layers_give_the_resident_output(reference, placement, kinds):
    llm = tierkv.load(device="cpu", prefill_chunk=PREFILL, placement=placement)
    try:
        assert replies(llm) == reference
        w = llm.stats["weights"]
        assert {k: v for k, v in w["counts"].items() if v and k != "gpu"} == kinds
        assert w["counts"]["gpu"] == 30 - sum(kinds.values())
        layer_bytes = w["bytes"]["gpu"] // w["counts"]["gpu"]
        streamed = kinds.get("host", 0) + kinds.get("disk", 0)
        if streamed:
            # the last call's NEW - 1 decode steps copied every streamed layer once each
            assert w["streamed_bytes_per_token"] == streamed * layer_bytes
            assert w["wait_ms_per_token"] > 0 and w["achieved_gbps"] > 0
            st = llm.model.weights.streamer
            assert len(st.slots) == (3 if placement.startswith(("host=1,2", "host=0,29")) else 2)
            assert w["device_bytes"] == w["bytes"]["gpu"] + len(st.slots) * layer_bytes
        if "disk" in kinds:
            disk = llm.model.weights.streamer.disk
            assert disk.spill is None  # fp32 checkpoint, fp32 model: read in place at the tensors' offsets
            assert all(e.path.endswith(".safetensors") for ex in disk.extents.values() for e in ex)
            assert w["disk_bytes_per_token"] == kinds["disk"] * layer_bytes
            assert w["disk"]["reads"] == kinds["disk"] * (NEW - 1)
        if "cpu" in kinds:
            assert w["bytes"]["cpu"] == kinds["cpu"] * layer_bytes
    finally:
        llm.unload()


def test_layer_after_layer_prefill_fetches_each_layer_once(base):
    ids = torch.tensor(base.encode(prompt=" ".join([LONG] * 4)))
    want = layer_prefill_logits(base.model, ids)
    llm = tierkv.load(device="cpu", placement="host=0,7,8 disk=15 cpu=22")
    try:
        st = llm.model.weights.streamer
        st.reset_stats()
        assert torch.equal(layer_prefill_logits(llm.model, ids), want)
        assert st.stats()["fetches"] == 4  # one per streamed layer for the whole prompt
    finally:
        llm.unload()


def test_gpu_budget_plans_placement_and_kv_budget(reference):
    llm = tierkv.load(device="cpu", prefill_chunk=PREFILL, gpu_budget="800MiB", cpu_budget="2GiB", ctx_size=2048)
    try:
        plan = llm.plan
        assert 0 < plan.count("gpu") < 30 and plan.count("host") > 0
        assert llm.model.weights.placement == plan.layers
        assert llm.tier.kv_gpu_budget == plan.gpu["kv_fixed"] + plan.gpu["kv_pool"]
        assert llm.tier.attention == plan.attention
        # resident layers and slots take what the plan gave them
        assert llm.model.weights.device_bytes() <= plan.gpu["weights"] + plan.gpu["staging"]
        assert replies(llm) == reference
    finally:
        llm.unload()


def test_random_shape_disk_layers_go_through_a_spill_file(reference, tmp_path):
    ids = list(range(3, 40))
    base = tierkv.load("llama-tiny", device="cpu")
    want = list(base.stream_ids(ids, max_new_tokens=5))
    llm = tierkv.load("llama-tiny", device="cpu", placement="disk=0 host=1", disk_dir=str(tmp_path))
    try:
        disk = llm.model.weights.streamer.disk
        assert disk.spill is not None and disk.spill.path.startswith(str(tmp_path))
        assert not Path(disk.spill.path).exists()  # POSIX: unlinked once open, nothing left behind
        assert list(llm.stream_ids(ids, max_new_tokens=5)) == want
        assert llm.stats["weights"]["disk"]["reads"] == 4
    finally:
        llm.unload()


@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"gpu_budget": "twelve gigs"}, ConfigError, "gpu_budget='twelve gigs' is not a size"),
    ({"gpu_budget": "100000TiB"}, BudgetError, "gpu_budget=100000.00 TiB is more than"),
    ({"gpu_budget": "800MiB", "cpu_budget": "100000TiB"}, BudgetError, "cpu_budget=100000.00 TiB is more than"),
    ({"gpu_budget": "1MiB"}, BudgetError, "does not fit gpu_budget"),
    ({"placement": "host=30"}, ConfigError, "layers are 0..29"),
    ({"placement": "tpu=1"}, ConfigError, "'tpu' is unknown"),
])
def test_bad_budgets_and_placements_are_one_line_errors(kwargs, error, fragment):
    with pytest.raises(error) as err:
        tierkv.load(device="cpu", **kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_parse_placement_forms():
    assert parse_placement("host=1,3 cpu=0", 4) == ("cpu", "host", "gpu", "host")
    assert parse_placement("gpu,disk,gpu", 3) == ("gpu", "disk", "gpu")
    assert parse_placement({2: "disk"}, 3) == ("gpu", "gpu", "disk")
    with pytest.raises(ConfigError, match="2 entries for 3 layers"):
        parse_placement("gpu,gpu", 3)



@pytest.mark.slow  # a second model load in a subprocess
def test_cli_run_places_layers_and_reports_weights():
    r = subprocess.run([sys.executable, "-m", "tierkv", "run", "--device", "cpu",
                        "--placement", "host=3,9 disk=5 cpu=7", "--stats", "-n", "3", "--raw", "The capital of France is"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    stats = json.loads(next(line for line in lines if line.startswith("{")))
    assert stats["weights"]["counts"] == {"gpu": 26, "host": 2, "disk": 1, "cpu": 1}
    assert stats["weights"]["streamed_bytes_per_token"] == 3 * stats["weights"]["bytes"]["cpu"]
    assert any(line.startswith("weights: layers 26 gpu, 2 host, 1 disk, 1 cpu") for line in lines)


def test_cli_bad_gpu_budget_is_one_line():
    r = subprocess.run([sys.executable, "-m", "tierkv", "run", "--device", "cpu", "--gpu-budget", "twelve", "hi"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and r.stderr.strip() == ("error: gpu_budget='twelve' is not a size; use e.g. '512MiB', "
                                                      "'24GiB' or '1.5GB'")


def test_a_session_saved_with_layer_0_on_disk_resumes_on_a_resident_load(tmp_path):
    """Layer 0's weights stay on disk (never read at load), so the session identifies the weights by the embedding
    and lm_head rows; the resident load of the same model takes the session and replies as the placed one."""
    placed = tierkv.load("llama-tiny", device="cpu", placement="disk=0 host=1", disk_dir=str(tmp_path / "spill"))
    try:
        chat = placed.chat(max_new_tokens=4)
        chat.send("hello there")
        chat.save(tmp_path / "session")
        want = chat.send("and again")
    finally:
        placed.unload()
    resident = tierkv.load("llama-tiny", device="cpu")
    resumed = tierkv.Chat.load(tmp_path / "session", resident, max_new_tokens=4)
    assert resumed.send("and again") == want
    resumed.close()
