"""The plan `tierkv.load(gpu_budget=...)` runs before any weight loads: budgets parsed and checked against this
machine, the planner asked, and what the loader takes from its answer (placement, kv_gpu_budget, attention);
`Offload` turns that (or a forced `placement=`) into the layer placer the model is built with, and
`weight_stats` is the `llm.stats["weights"]` of a generate call.

On a CPU device the "GPU" is the compute device's share of host memory: gpu_budget is checked against the
machine's total memory and the plan splits it as it would a GPU's, so the offload paths run on the CPU too.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace

import torch

from tierkv.config import TierConfig, format_size, parse_size
from tierkv.errors import BudgetError
from tierkv.models.config import ModelConfig
from tierkv.models.weights import TensorSource
from tierkv.plan.bandwidth import load_bandwidths
from tierkv.plan.budgets import check_cpu_budget, check_gpu_budget
from tierkv.plan.inputs import PlanInputs
from tierkv.plan.planner import make_plan
from tierkv.plan.result import Plan
from tierkv.weights.disk import safetensors_index
from tierkv.weights.store import LayerPlacer, parse_placement

DEFAULT_CPU_SHARE = 0.8  # of the memory available now, when no cpu_budget is given
DISK_SHARE = 0.9  # of the free space of disk_dir the plan may use
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class LoadPlan:
    plan: Plan
    placement: tuple[str, ...]
    kv_gpu_budget: int  # the plan's GPU bytes for the KV cache: its fixed parts and the pool


def check_device_budget(nbytes: int, device: torch.device) -> None:
    """gpu_budget against the compute device's memory (a CPU device: the machine's total memory)."""
    if device.type == "cuda":
        check_gpu_budget(nbytes)
        return
    import psutil

    total = psutil.virtual_memory().total
    if nbytes > total:
        raise BudgetError(f"gpu_budget={format_size(nbytes)} is more than the {format_size(total)} of memory of "
                          f"this CPU device; lower gpu_budget to at most {format_size(total)}")


def plan_for_load(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, context: int, gpu_budget,
                  cpu_budget=None, disk_dir: str | None = None, attention: str | None = None,
                  token_budget: int | float | None = None, budget_floor_tokens: int | None = None) -> LoadPlan:
    """The plan for loading cfg under the budgets (strings like '12GiB' or bytes); BudgetError for a budget
    that does not parse (ConfigError), exceeds this machine, or cannot hold the model (PlanDoesNotFitError)."""
    import psutil

    gpu = parse_size(gpu_budget, "gpu_budget")
    cpu = parse_size(cpu_budget, "cpu_budget")
    check_device_budget(gpu, device)
    if cpu is None:
        cpu = int(psutil.virtual_memory().available * DEFAULT_CPU_SHARE)
    else:
        check_cpu_budget(cpu)
    disk = int(shutil.disk_usage(disk_dir).free * DISK_SHARE) if disk_dir else 0
    gpu_name = torch.cuda.get_device_properties(device).name if device.type == "cuda" else None
    asked = {"token_budget": token_budget, "budget_floor_tokens": budget_floor_tokens}
    extra = {k: v for k, v in asked.items() if v is not None}
    inputs = PlanInputs(cfg, context, gpu, cpu, disk, dtype=DTYPE_NAMES[dtype], attention=attention,
                        bandwidths=load_bandwidths(None, gpu_name), **extra)
    plan = make_plan(inputs)
    if plan.embedding == "host":
        # the runtime keeps the embedding on the device (a host gather would sync in the captured step): plan the
        # rest in what the embedding leaves
        emb = cfg.vocab_size * cfg.hidden_size * inputs.elem_bytes
        if gpu - emb <= 0:
            raise BudgetError(f"gpu_budget={format_size(gpu)} cannot hold the {format_size(emb)} embedding; "
                              f"raise gpu_budget")
        plan = make_plan(replace(inputs, gpu_budget=gpu - emb))
        plan = replace(plan, reasons=(f"embedding ({format_size(emb)}) kept on the device by the runtime: the "
                                      f"layers were planned in gpu_budget - embedding", *plan.reasons))
    return LoadPlan(plan, plan.layers, plan.gpu["kv_fixed"] + plan.gpu["kv_pool"])


class Offload:
    """What load() was asked about weight placement (gpu_budget, placement) and what it decided."""

    def __init__(self, gpu_budget, placement, ctx_size: int | None) -> None:
        self.gpu_budget, self.placement, self.ctx_size = gpu_budget, placement, ctx_size
        self.plan = None  # the planner's Plan when gpu_budget was given

    def prepare(self, cfg: ModelConfig, dev: torch.device, dt: torch.dtype, tier: TierConfig, given: dict,
                index: TensorSource | None) -> tuple[TierConfig, LayerPlacer | None]:
        """(the tier settings with the plan's kv_gpu_budget and attention unless given, the layer placer or None
        when every layer stays resident). Plans before any weight loads, so a bad budget costs no load time."""
        places = None
        if self.gpu_budget is not None:
            context = min(self.ctx_size or cfg.max_position_embeddings, cfg.max_position_embeddings)
            lp = plan_for_load(cfg, dt, dev, context, self.gpu_budget, given.get("cpu_budget"), tier.disk_dir,
                               given.get("attention"), given.get("token_budget"), given.get("budget_floor_tokens"))
            self.plan, places = lp.plan, lp.placement
            changes = {}
            if "kv_gpu_budget" not in given:
                changes["kv_gpu_budget"] = lp.kv_gpu_budget
            if "attention" not in given:
                changes["attention"] = lp.plan.attention
            tier = tier.replace(**changes)
        if self.placement is not None:
            places = parse_placement(self.placement, cfg.num_layers)
        if places is None or all(p == "gpu" for p in places):
            return tier, None
        stored = safetensors_index(index.files()) if index is not None else None
        return tier, LayerPlacer(places, dev, dt, slots=_slots(places), index=stored, spill_dir=tier.disk_dir)


def _slots(places: tuple[str, ...]) -> int:
    """Staging slots: 3 when two streamed layers are neighbours around the ring (a copy must run while the next
    streamed layer waits), else 2 (the planner's rule)."""
    streamed = [p in ("host", "disk") for p in places]
    n = len(streamed)
    return 3 if any(streamed[i] and streamed[(i + 1) % n] for i in range(n)) and sum(streamed) > 1 else 2


def weight_stats(llm, stats) -> dict:
    """Weight traffic of the last call's decode steps: placement, bytes streamed per token, achieved GB/s, time
    waiting on weights. A captured decode step does not count its own copies, so there the bytes are the
    streamed layers' (each is copied once a token) and GB/s is bytes over the decode time."""
    ws = llm.model.weights.stats()
    steps = max(stats.new_tokens - 1, 0)
    out = {k: ws[k] for k in ("placement", "counts", "bytes", "device_bytes", "capturable")}
    st = ws.get("streamer")
    if st is None or not steps:
        return out
    graph = llm.uses_graph
    per_token = ws["streamed_bytes_per_token"] if graph else st["bytes"] / steps
    out.update(streamer_mode=st["mode"], slots=st["slots"], pinned_host_bytes=st["host_bytes"],
               decode="graph" if graph else "eager", streamed_bytes_per_token=per_token)
    if graph:
        steady, seconds = stats.steady()  # the first step captures the graph: leave it out
        out["achieved_gbps"] = per_token * steady / seconds / 1e9 if seconds > 0 else None
        out["achieved_gbps_from"] = ("streamed bytes / decode time after the first step (a lower bound: copies "
                                     "overlap compute)")
    else:
        out["achieved_gbps"] = st["bytes"] / st["copy_s"] / 1e9 if st["copy_s"] else None
        out["achieved_gbps_from"] = "streamed bytes / time the copies took"
        out["wait_ms_per_token"] = 1e3 * st["wait_s"] / steps
        out["disk_bytes_per_token"] = st["disk_bytes"] / steps
    if "disk" in ws:
        out["disk"] = ws["disk"]
    return out
